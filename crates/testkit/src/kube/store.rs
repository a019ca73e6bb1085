//! The emulator's state and the API semantics applied to every write: `resourceVersion` on
//! every change and `409` on a stale one, `generation` that moves only on spec changes, the
//! status subresource kept apart from the main resource, patches, finalizers with
//! `deletionTimestamp`, namespace termination, and CRDs that start serving their resource.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use rand::Rng;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::selectors::{FieldSelector, LabelSelector};
use super::ssa;

/// `(group, plural)`: the storage identity of a resource type.
pub type TypeKey = (String, String);

/// A served resource type.
#[derive(Clone, Debug)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status_subresource: bool,
    /// `additionalPrinterColumns` of a CRD version.
    pub printer_columns: Vec<Value>,
    /// The `openAPIV3Schema` of a CRD version.
    pub schema: Option<Value>,
    /// Defined by a CustomResourceDefinition.
    pub custom: bool,
}

impl ResourceType {
    fn builtin(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        namespaced: bool,
        status: bool,
        short: &[&str],
    ) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            namespaced,
            short_names: short.iter().map(|s| s.to_string()).collect(),
            categories: Vec::new(),
            status_subresource: status,
            printer_columns: Vec::new(),
            schema: None,
            custom: false,
        }
    }

    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn key(&self) -> TypeKey {
        (self.group.clone(), self.plural.clone())
    }

    /// Whether `metadata.generation` is maintained (custom resources and CRDs).
    fn tracks_generation(&self) -> bool {
        self.custom || self.plural == "customresourcedefinitions"
    }

    fn is_crd(&self) -> bool {
        self.group == "apiextensions.k8s.io" && self.plural == "customresourcedefinitions"
    }

    fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.plural == "namespaces"
    }
}

/// The built-in types the emulator serves.
pub fn builtin_types() -> Vec<ResourceType> {
    vec![
        ResourceType::builtin("", "v1", "Namespace", "namespaces", false, true, &["ns"]),
        ResourceType::builtin("", "v1", "Secret", "secrets", true, false, &[]),
        ResourceType::builtin("", "v1", "ConfigMap", "configmaps", true, false, &["cm"]),
        ResourceType::builtin("", "v1", "Event", "events", true, false, &["ev"]),
        ResourceType::builtin(
            "",
            "v1",
            "ServiceAccount",
            "serviceaccounts",
            true,
            false,
            &["sa"],
        ),
        ResourceType::builtin(
            "events.k8s.io",
            "v1",
            "Event",
            "events",
            true,
            false,
            &["ev"],
        ),
        ResourceType::builtin(
            "coordination.k8s.io",
            "v1",
            "Lease",
            "leases",
            true,
            false,
            &[],
        ),
        ResourceType::builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
            true,
            &["crd", "crds"],
        ),
    ]
}

/// An API error, rendered as a `Status` object.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, rt: &ResourceType, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": rt.group, "kind": rt.plural}));
        self
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        let what = if rt.group.is_empty() {
            rt.plural.clone()
        } else {
            format!("{}.{}", rt.plural, rt.group)
        };
        Self::new(404, "NotFound", format!("{what} \"{name}\" not found")).with_details(rt, name)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn invalid(rt: &ResourceType, name: &str, message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message).with_details(rt, name)
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The kind of a recorded change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        }
    }
}

/// One change of one object, as watches see it.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub type_key: TypeKey,
    pub kind: ChangeKind,
    pub object: Arc<Value>,
    /// The object before a modification, so watches with selectors can tell an object
    /// leaving or entering the selection.
    pub previous: Option<Arc<Value>>,
}

struct TypeState {
    /// Served versions of this type.
    versions: BTreeMap<String, Arc<ResourceType>>,
    objects: BTreeMap<(String, String), Value>,
}

/// Options of a write.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_manager: Option<String>,
    pub force: bool,
}

/// The kinds of patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Strategic,
    Json,
    Apply,
}

/// All objects and the change history.
pub struct Store {
    rv: u64,
    types: BTreeMap<TypeKey, TypeState>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    /// Changes at or below this resourceVersion are no longer in the history.
    compacted_rv: u64,
    pub tx: broadcast::Sender<Arc<Change>>,
}

fn now_rfc3339() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn new_uid() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    let h = hex::encode(bytes);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn meta(object: &Value) -> Option<&Map<String, Value>> {
    object.get("metadata").and_then(Value::as_object)
}

fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

/// Whether a write changes nothing but what the server keeps itself (`resourceVersion`,
/// `managedFields`): such a write is a no-op, as on a real API server. Compared in place,
/// since cloning both objects per write was most of the emulator's time at 10,000 objects.
fn same_but_bookkeeping(a: &Value, b: &Value) -> bool {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return a == b;
    };
    let empty = Map::new();
    fn meta_of(o: &Map<String, Value>) -> Option<&Map<String, Value>> {
        o.get("metadata").and_then(Value::as_object)
    }
    same_fields_except(a, b, &["metadata"])
        && same_fields_except(
            meta_of(a).unwrap_or(&empty),
            meta_of(b).unwrap_or(&empty),
            &["resourceVersion", "managedFields"],
        )
}

/// Whether two maps hold the same fields, leaving out `skipped`.
fn same_fields_except(a: &Map<String, Value>, b: &Map<String, Value>, skipped: &[&str]) -> bool {
    let kept = |m: &Map<String, Value>| m.keys().filter(|k| !skipped.contains(&k.as_str())).count();
    kept(a) == kept(b)
        && a.iter()
            .filter(|(k, _)| !skipped.contains(&k.as_str()))
            .all(|(k, v)| b.get(k) == Some(v))
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    meta(object)?.get(field)?.as_str()
}

fn finalizers(object: &Value) -> Vec<String> {
    meta(object)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Everything but metadata and status: what moves `generation`.
fn spec_part(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
        map.remove("apiVersion");
        map.remove("kind");
    }
    copy
}

/// Drops strategic-merge directives (`$patch`, `$setElementOrder/…`, `$retainKeys`).
fn strip_directives(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with('$'));
            map.values_mut().for_each(strip_directives);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let (tx, _) = broadcast::channel(65_536);
        let mut store = Self {
            rv: 1,
            types: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit,
            compacted_rv: 0,
            tx,
        };
        for rt in builtin_types() {
            store.register(rt);
        }
        store
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Oldest resourceVersion a watch can resume from.
    pub fn compacted_rv(&self) -> u64 {
        self.compacted_rv
    }

    /// Forgets the change history: watches resuming from before now get `410 Gone`.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted_rv = self.rv;
    }

    fn register(&mut self, rt: ResourceType) {
        let entry = self.types.entry(rt.key()).or_insert_with(|| TypeState {
            versions: BTreeMap::new(),
            objects: BTreeMap::new(),
        });
        entry.versions.insert(rt.version.clone(), Arc::new(rt));
    }

    /// Every served type, one entry per version.
    pub fn served_types(&self) -> Vec<Arc<ResourceType>> {
        self.types
            .values()
            .flat_map(|t| t.versions.values().cloned())
            .collect()
    }

    /// The type served at `group/version` under `plural`.
    pub fn resolve(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .get(&(group.to_string(), plural.to_string()))?
            .versions
            .get(version)
            .cloned()
    }

    /// How many objects of `(group, plural)` satisfy `pred` (for harnesses; no copies made).
    pub fn count_where(&self, group: &str, plural: &str, pred: impl Fn(&Value) -> bool) -> usize {
        self.types
            .get(&(group.to_string(), plural.to_string()))
            .map(|t| t.objects.values().filter(|o| pred(o)).count())
            .unwrap_or(0)
    }

    /// The keys (namespace, name) of objects of `(group, plural)` satisfying `pred`, and a
    /// receiver of every change made after them: a harness follows a condition without
    /// rescanning the store.
    pub fn select_and_follow(
        &self,
        group: &str,
        plural: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (HashSet<(String, String)>, broadcast::Receiver<Arc<Change>>) {
        let selected = self
            .types
            .get(&(group.to_string(), plural.to_string()))
            .map(|t| {
                t.objects
                    .iter()
                    .filter(|(_, o)| pred(o))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        (selected, self.tx.subscribe())
    }

    /// Changes after `rv` of one type, or `None` when `rv` is older than the history.
    pub fn changes_since(&self, type_key: &TypeKey, rv: u64) -> Option<Vec<Arc<Change>>> {
        if rv < self.compacted_rv {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|c| c.rv > rv && &c.type_key == type_key)
                .cloned()
                .collect(),
        )
    }

    fn record(
        &mut self,
        type_key: TypeKey,
        kind: ChangeKind,
        object: Value,
        previous: Option<Value>,
    ) {
        let change = Arc::new(Change {
            rv: self.rv,
            type_key,
            kind,
            object: Arc::new(object),
            previous: previous.map(Arc::new),
        });
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
        let _ = self.tx.send(change);
    }

    fn objects(&self, rt: &ResourceType) -> &BTreeMap<(String, String), Value> {
        &self
            .types
            .get(&rt.key())
            .expect("a resolved type is registered")
            .objects
    }

    fn objects_mut(&mut self, rt: &ResourceType) -> &mut BTreeMap<(String, String), Value> {
        &mut self
            .types
            .get_mut(&rt.key())
            .expect("a resolved type is registered")
            .objects
    }

    /// Renders a stored object at a served version.
    fn present(rt: &ResourceType, object: &Value) -> Value {
        Self::present_owned(rt, object.clone())
    }

    fn present_owned(rt: &ResourceType, mut object: Value) -> Value {
        object["apiVersion"] = Value::String(rt.api_version());
        object["kind"] = Value::String(rt.kind.clone());
        object
    }

    fn namespace_of(rt: &ResourceType, ns: Option<&str>) -> String {
        if rt.namespaced {
            ns.unwrap_or("").to_string()
        } else {
            String::new()
        }
    }

    pub fn get(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> ApiResult<Value> {
        let key = (Self::namespace_of(rt, ns), name.to_string());
        self.objects(rt)
            .get(&key)
            .map(|o| Self::present(rt, o))
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Lists objects in `ns` (all namespaces when `None`) that match the selectors, after
    /// the `continue` position, at most `limit`. Returns the items and the next position.
    pub fn list(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        limit: Option<usize>,
        after: Option<(String, String)>,
    ) -> (Vec<Value>, Option<(String, String)>) {
        let mut items = Vec::new();
        let objects = self.objects(rt);
        let range: Box<dyn Iterator<Item = (&(String, String), &Value)>> = match &after {
            Some(position) => Box::new(objects.range((
                std::ops::Bound::Excluded(position.clone()),
                std::ops::Bound::Unbounded,
            ))),
            None => Box::new(objects.iter()),
        };
        let mut next = None;
        for (key, object) in range {
            if rt.namespaced && ns.is_some_and(|n| n != key.0) {
                continue;
            }
            if !labels.matches(object) || !fields.matches(object) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                next = Some(items_last_key(&items));
                break;
            }
            items.push(Self::present(rt, object));
        }
        (items, next.flatten())
    }

    fn check_namespace(&self, rt: &ResourceType, ns: &str) -> ApiResult<()> {
        if !rt.namespaced {
            return Ok(());
        }
        let namespaces = self
            .types
            .get(&(String::new(), "namespaces".into()))
            .expect("namespaces are built in");
        match namespaces.objects.get(&(String::new(), ns.to_string())) {
            None => Err(
                ApiError::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
                    .with_details(
                        &ResourceType::builtin(
                            "",
                            "v1",
                            "Namespace",
                            "namespaces",
                            false,
                            true,
                            &[],
                        ),
                        ns,
                    ),
            ),
            Some(namespace) if meta_str(namespace, "deletionTimestamp").is_some() => {
                Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        rt.plural
                    ),
                ))
            }
            Some(_) => Ok(()),
        }
    }

    /// Creates an object.
    pub fn create(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        mut object: Value,
        options: &WriteOptions,
    ) -> ApiResult<Value> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the body is not an object"));
        }
        let namespace = Self::namespace_of(rt, ns);
        if let Some(body_ns) = meta_str(&object, "namespace")
            && rt.namespaced
            && !body_ns.is_empty()
            && body_ns != namespace
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let name = match meta_str(&object, "name").filter(|n| !n.is_empty()) {
            Some(name) => name.to_string(),
            None => match meta_str(&object, "generateName") {
                Some(prefix) => {
                    let suffix: String = (0..5)
                        .map(|_| {
                            char::from(
                                b"bcdfghjklmnpqrstvwxz2456789"[rand::rng().random_range(0..27)],
                            )
                        })
                        .collect();
                    format!("{prefix}{suffix}")
                }
                None => {
                    return Err(ApiError::invalid(
                        rt,
                        "",
                        format!(
                            "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                            rt.kind
                        ),
                    ));
                }
            },
        };
        self.check_namespace(rt, &namespace)?;
        // As kube-apiserver validates events.k8s.io/v1: an Event about a cluster-scoped
        // object may only be in `default` or `kube-system`.
        if rt.group == "events.k8s.io" {
            let regarding_ns = object
                .pointer("/regarding/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if regarding_ns.is_empty() && namespace != "default" && namespace != "kube-system" {
                return Err(ApiError::invalid(
                    rt,
                    &name,
                    format!(
                        "Event.events.k8s.io \"{name}\" is invalid: involvedObject.namespace: Invalid value: \"\": does not match event.namespace"
                    ),
                ));
            }
        }
        let key = (namespace.clone(), name.clone());
        if self.objects(rt).contains_key(&key) {
            let what = if rt.group.is_empty() {
                rt.plural.clone()
            } else {
                format!("{}.{}", rt.plural, rt.group)
            };
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{what} \"{name}\" already exists"),
            )
            .with_details(rt, &name));
        }
        if rt.is_crd() {
            validate_crd(&object)?;
        }
        normalize_secret(rt, &mut object);
        {
            let m = meta_mut(&mut object);
            m.insert("name".into(), Value::String(name.clone()));
            if rt.namespaced {
                m.insert("namespace".into(), Value::String(namespace.clone()));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), Value::String(new_uid()));
            m.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
            m.remove("deletionTimestamp");
            m.remove("resourceVersion");
            m.remove("managedFields");
            if rt.tracks_generation() {
                m.insert("generation".into(), json!(1));
            } else {
                m.remove("generation");
            }
        }
        if rt.status_subresource && rt.custom {
            object.as_object_mut().expect("checked").remove("status");
        }
        if rt.is_namespace() {
            object["status"] = json!({"phase": "Active"});
        }
        let manager = options.field_manager.clone();
        let fields = ssa::changed_fields(&Value::Null, &object, rt.schema.as_ref());
        let mut managed = Managed::default();
        if let Some(manager) = manager {
            managed.record_update(&manager, rt, None, fields);
        }
        managed.store(&mut object);
        self.commit(rt, key, None, object, options)
    }

    /// Replaces an object (or its status, for `subresource == Some("status")`).
    pub fn update(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        object: Value,
        subresource: Option<&str>,
        options: &WriteOptions,
    ) -> ApiResult<Value> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the body is not an object"));
        }
        if let Some(body_name) = meta_str(&object, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let key = (Self::namespace_of(rt, ns), name.to_string());
        let current = self
            .objects(rt)
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        if let Some(rv) = meta_str(&object, "resourceVersion").filter(|rv| !rv.is_empty())
            && Some(rv) != meta_str(&current, "resourceVersion")
        {
            return Err(conflict(rt, name));
        }
        let manager = options.field_manager.clone();
        self.write(
            rt,
            key,
            current,
            object,
            subresource,
            options,
            |managed, rt, old, new| {
                if let Some(manager) = &manager {
                    managed.record_update(
                        manager,
                        rt,
                        subresource,
                        ssa::changed_fields(old, new, rt.schema.as_ref()),
                    );
                }
            },
        )
    }

    /// Patches an object; an apply patch creates it when missing.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: PatchKind,
        patch: Value,
        subresource: Option<&str>,
        options: &WriteOptions,
    ) -> ApiResult<Value> {
        let key = (Self::namespace_of(rt, ns), name.to_string());
        let current = self.objects(rt).get(&key).cloned();
        let Some(current) = current else {
            if kind == PatchKind::Apply && subresource.is_none() {
                let mut object = patch;
                meta_mut(&mut object).insert("name".into(), Value::String(name.to_string()));
                let manager = options.field_manager.clone().ok_or_else(|| {
                    ApiError::bad_request("fieldManager is required for apply requests")
                })?;
                let fields = ssa::fields_of(&object, rt.schema.as_ref());
                let created = self.create(
                    rt,
                    ns,
                    object,
                    &WriteOptions {
                        field_manager: None,
                        ..options.clone()
                    },
                )?;
                if options.dry_run {
                    return Ok(created);
                }
                // Record the applier as owner of what it applied.
                let mut stored = self.objects(rt).get(&key).cloned().expect("just created");
                let mut managed = Managed::load(&stored);
                managed.record_apply(&manager, rt, None, fields);
                managed.store(&mut stored);
                self.objects_mut(rt).insert(key, stored.clone());
                return Ok(Self::present(rt, &stored));
            }
            return Err(ApiError::not_found(rt, name));
        };
        match kind {
            PatchKind::Merge | PatchKind::Strategic => {
                let mut patch = patch;
                if kind == PatchKind::Strategic {
                    strip_directives(&mut patch);
                }
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                if let Some(rv) = patch
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    && Some(rv) != meta_str(&current, "resourceVersion")
                {
                    return Err(conflict(rt, name));
                }
                let mut new = current.clone();
                json_patch::merge(&mut new, &patch);
                let manager = options.field_manager.clone();
                self.write(
                    rt,
                    key,
                    current,
                    new,
                    subresource,
                    options,
                    |managed, rt, old, new| {
                        if let Some(manager) = &manager {
                            managed.record_update(
                                manager,
                                rt,
                                subresource,
                                ssa::changed_fields(old, new, rt.schema.as_ref()),
                            );
                        }
                    },
                )
            }
            PatchKind::Json => {
                let ops: json_patch::Patch = serde_json::from_value(patch)
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                let mut new = Self::present(rt, &current);
                json_patch::patch(&mut new, &ops).map_err(|e| {
                    ApiError::invalid(
                        rt,
                        name,
                        format!("the JSON patch could not be applied: {e}"),
                    )
                })?;
                let manager = options.field_manager.clone();
                self.write(
                    rt,
                    key,
                    current,
                    new,
                    subresource,
                    options,
                    |managed, rt, old, new| {
                        if let Some(manager) = &manager {
                            managed.record_update(
                                manager,
                                rt,
                                subresource,
                                ssa::changed_fields(old, new, rt.schema.as_ref()),
                            );
                        }
                    },
                )
            }
            PatchKind::Apply => {
                let manager = options.field_manager.clone().ok_or_else(|| {
                    ApiError::bad_request("fieldManager is required for apply requests")
                })?;
                if !patch.is_object() {
                    return Err(ApiError::bad_request(
                        "an apply configuration must be an object",
                    ));
                }
                let schema = rt.schema.as_ref();
                // Only the part the endpoint writes counts: status on /status, the rest on
                // the main resource when status is a subresource.
                let mut applied = patch;
                if rt.status_subresource {
                    let obj = applied.as_object_mut().expect("checked");
                    if subresource == Some("status") {
                        obj.retain(|k, _| {
                            k == "status" || k == "apiVersion" || k == "kind" || k == "metadata"
                        });
                        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                            m.retain(|k, _| k == "name" || k == "namespace");
                        }
                    } else {
                        obj.remove("status");
                    }
                }
                let new_fields = ssa::fields_of(&applied, schema);
                let mut managed = Managed::load(&current);
                let old_fields = managed.fields_of(&manager, "Apply", subresource);
                let mut new = current.clone();
                for stale in old_fields.difference(&new_fields) {
                    if !managed.owned_by_other(&manager, subresource, stale) {
                        ssa::remove_at(&mut new, stale, schema);
                    }
                }
                ssa::merge(&mut new, &applied, schema);
                managed.record_apply(&manager, rt, subresource, new_fields);
                self.write(
                    rt,
                    key,
                    current,
                    new,
                    subresource,
                    options,
                    move |m, _, _, _| {
                        *m = managed.clone();
                    },
                )
            }
        }
    }

    /// The common path of updates and patches.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        rt: &ResourceType,
        key: (String, String),
        current: Value,
        mut new: Value,
        subresource: Option<&str>,
        options: &WriteOptions,
        record: impl FnOnce(&mut Managed, &ResourceType, &Value, &Value),
    ) -> ApiResult<Value> {
        let name = key.1.clone();
        if !new.is_object() {
            return Err(ApiError::bad_request("the result is not an object"));
        }
        match subresource {
            Some("status") => {
                // Only status changes through /status.
                let status = new.get("status").cloned();
                new = current.clone();
                match status {
                    Some(status) => new["status"] = status,
                    None => {
                        new.as_object_mut().expect("an object").remove("status");
                    }
                }
            }
            Some(other) => {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource ({other})"),
                ));
            }
            None => {
                if rt.status_subresource {
                    match current.get("status") {
                        Some(status) => new["status"] = status.clone(),
                        None => {
                            new.as_object_mut().expect("an object").remove("status");
                        }
                    }
                }
            }
        }
        // Server-owned metadata.
        {
            let old_meta = meta(&current).cloned().unwrap_or_default();
            let m = meta_mut(&mut new);
            for field in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "name",
                "namespace",
                "resourceVersion",
            ] {
                match old_meta.get(field) {
                    Some(v) => {
                        m.insert(field.into(), v.clone());
                    }
                    None => {
                        m.remove(field);
                    }
                }
            }
            if subresource.is_some() {
                // Metadata does not change through a subresource.
                let managed = m.get("managedFields").cloned();
                *m = old_meta.clone();
                if let Some(managed) = managed {
                    m.insert("managedFields".into(), managed);
                }
            }
        }
        if meta_str(&current, "deletionTimestamp").is_some() {
            let before = finalizers(&current);
            if let Some(added) = finalizers(&new).into_iter().find(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    rt,
                    &name,
                    format!(
                        "{} \"{name}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers [\"{added}\"]",
                        rt.kind
                    ),
                ));
            }
        }
        if rt.is_crd() {
            validate_crd(&new)?;
        }
        normalize_secret(rt, &mut new);
        if rt.tracks_generation() && spec_part(&new) != spec_part(&current) {
            let generation = meta(&current)
                .and_then(|m| m.get("generation"))
                .and_then(Value::as_i64)
                .unwrap_or(1);
            meta_mut(&mut new).insert("generation".into(), json!(generation + 1));
        }
        let mut managed = Managed::load(&current);
        record(&mut managed, rt, &current, &new);
        managed.store(&mut new);
        self.commit(rt, key, Some(current), new, options)
    }

    /// Stores `new` (unless nothing changed), records the change, and completes a deletion
    /// whose finalizers are gone.
    fn commit(
        &mut self,
        rt: &ResourceType,
        key: (String, String),
        old: Option<Value>,
        mut new: Value,
        options: &WriteOptions,
    ) -> ApiResult<Value> {
        if rt.is_crd() {
            crd_status(&mut new);
        }
        if let Some(old) = &old
            && same_but_bookkeeping(old, &new)
        {
            return Ok(Self::present(rt, old));
        }
        if options.dry_run {
            return Ok(Self::present(rt, &new));
        }
        self.rv += 1;
        meta_mut(&mut new).insert("resourceVersion".into(), Value::String(self.rv.to_string()));
        let stored = Self::present_owned(rt, new);
        self.objects_mut(rt).insert(key.clone(), stored.clone());
        let kind = if old.is_some() {
            ChangeKind::Modified
        } else {
            ChangeKind::Added
        };
        self.record(rt.key(), kind, stored.clone(), old);
        if rt.is_crd() {
            self.sync_crd(&stored);
        }
        if meta_str(&stored, "deletionTimestamp").is_some() && finalizers(&stored).is_empty() {
            if rt.is_namespace() && !self.namespace_empty(&key.1) {
                return Ok(stored);
            }
            self.remove(rt, &key);
        }
        Ok(stored)
    }

    fn remove(&mut self, rt: &ResourceType, key: &(String, String)) -> Option<Value> {
        let mut object = self.objects_mut(rt).remove(key)?;
        self.rv += 1;
        meta_mut(&mut object).insert("resourceVersion".into(), Value::String(self.rv.to_string()));
        self.record(rt.key(), ChangeKind::Deleted, object.clone(), None);
        if rt.is_crd() {
            self.unregister_crd(&object);
        }
        if rt.namespaced {
            self.finish_namespace_if_done(&key.0);
        }
        Some(object)
    }

    fn namespace_empty(&self, ns: &str) -> bool {
        self.types.values().all(|t| {
            !t.versions.values().next().is_some_and(|rt| rt.namespaced)
                || !t.objects.keys().any(|(n, _)| n == ns)
        })
    }

    fn finish_namespace_if_done(&mut self, ns: &str) {
        let ns_type = self
            .resolve("", "v1", "namespaces")
            .expect("namespaces are built in");
        let key = (String::new(), ns.to_string());
        let terminating = self
            .objects(&ns_type)
            .get(&key)
            .is_some_and(|n| meta_str(n, "deletionTimestamp").is_some());
        if terminating && self.namespace_empty(ns) {
            self.remove(&ns_type, &key);
        }
    }

    /// Deletes an object: with finalizers it gets a `deletionTimestamp` and stays until they
    /// are removed.
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        preconditions: Option<&Value>,
        options: &WriteOptions,
    ) -> ApiResult<Value> {
        let key = (Self::namespace_of(rt, ns), name.to_string());
        let current = self
            .objects(rt)
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        if let Some(pre) = preconditions {
            if let Some(uid) = pre.get("uid").and_then(Value::as_str)
                && Some(uid) != meta_str(&current, "uid")
            {
                return Err(conflict(rt, name));
            }
            if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str)
                && Some(rv) != meta_str(&current, "resourceVersion")
            {
                return Err(conflict(rt, name));
            }
        }
        if options.dry_run {
            return Ok(current);
        }
        if rt.is_namespace() {
            return self.delete_namespace(rt, key, current);
        }
        if finalizers(&current).is_empty() {
            return Ok(self.remove(rt, &key).expect("present"));
        }
        if meta_str(&current, "deletionTimestamp").is_some() {
            return Ok(current);
        }
        let mut new = current.clone();
        {
            let m = meta_mut(&mut new);
            m.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            if rt.tracks_generation() {
                let generation = m.get("generation").and_then(Value::as_i64).unwrap_or(1);
                m.insert("generation".into(), json!(generation + 1));
            }
        }
        self.commit(rt, key, Some(current), new, options)
    }

    fn delete_namespace(
        &mut self,
        rt: &ResourceType,
        key: (String, String),
        current: Value,
    ) -> ApiResult<Value> {
        let ns = key.1.clone();
        if meta_str(&current, "deletionTimestamp").is_none() {
            let mut new = current.clone();
            meta_mut(&mut new).insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
            new["status"] = json!({"phase": "Terminating"});
            self.commit(
                rt,
                key.clone(),
                Some(current.clone()),
                new,
                &WriteOptions::default(),
            )?;
        }
        // Delete the content; objects with finalizers stay until released.
        let content: Vec<(Arc<ResourceType>, String)> = self
            .types
            .values()
            .filter_map(|t| t.versions.values().next().cloned())
            .filter(|rt| rt.namespaced)
            .flat_map(|rt| {
                self.objects(&rt)
                    .keys()
                    .filter(|(n, _)| *n == ns)
                    .map(|(_, name)| (rt.clone(), name.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (rt, name) in content {
            let _ = self.delete(&rt, Some(&ns), &name, None, &WriteOptions::default());
        }
        self.finish_namespace_if_done(&ns);
        Ok(self
            .objects(rt)
            .get(&key)
            .cloned()
            .unwrap_or_else(|| Self::present(rt, &current)))
    }

    fn sync_crd(&mut self, crd: &Value) {
        let Some(spec) = crd.get("spec") else { return };
        let group = spec
            .get("group")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let names = spec.get("names").cloned().unwrap_or(Value::Null);
        let text = |v: &Value, f: &str| v.get(f).and_then(Value::as_str).unwrap_or("").to_string();
        let list = |v: &Value, f: &str| -> Vec<String> {
            v.get(f)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let plural = text(&names, "plural");
        let kind = text(&names, "kind");
        let namespaced = spec.get("scope").and_then(Value::as_str) != Some("Cluster");
        let key = (group.clone(), plural.clone());
        if let Some(existing) = self.types.get_mut(&key) {
            existing.versions.clear();
        }
        for version in spec
            .get("versions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if version.get("served").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            let singular = match text(&names, "singular") {
                s if s.is_empty() => kind.to_lowercase(),
                s => s,
            };
            self.register(ResourceType {
                group: group.clone(),
                version: text(version, "name"),
                kind: kind.clone(),
                plural: plural.clone(),
                singular,
                namespaced,
                short_names: list(&names, "shortNames"),
                categories: list(&names, "categories"),
                status_subresource: version.pointer("/subresources/status").is_some(),
                printer_columns: version
                    .get("additionalPrinterColumns")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                schema: version.pointer("/schema/openAPIV3Schema").cloned(),
                custom: true,
            });
        }
    }

    fn unregister_crd(&mut self, crd: &Value) {
        let group = crd
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let plural = crd
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let key = (group, plural);
        let Some(state) = self.types.get(&key) else {
            return;
        };
        let Some(rt) = state.versions.values().next().cloned() else {
            self.types.remove(&key);
            return;
        };
        let keys: Vec<(String, String)> = state.objects.keys().cloned().collect();
        for object_key in keys {
            self.remove(&rt, &object_key);
        }
        self.types.remove(&key);
    }
}

fn items_last_key(items: &[Value]) -> Option<(String, String)> {
    let last = items.last()?;
    Some((
        meta_str(last, "namespace").unwrap_or("").to_string(),
        meta_str(last, "name").unwrap_or("").to_string(),
    ))
}

fn conflict(rt: &ResourceType, name: &str) -> ApiError {
    let what = if rt.group.is_empty() {
        rt.plural.clone()
    } else {
        format!("{}.{}", rt.plural, rt.group)
    };
    ApiError::new(
        409,
        "Conflict",
        format!("Operation cannot be fulfilled on {what} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
    )
    .with_details(rt, name)
}

/// Secrets: `stringData` is folded into `data` (base64) and `type` defaults to Opaque.
fn normalize_secret(rt: &ResourceType, object: &mut Value) {
    if !(rt.group.is_empty() && rt.plural == "secrets") {
        return;
    }
    use base64::Engine as _;
    let string_data = object.as_object_mut().and_then(|o| o.remove("stringData"));
    if let Some(Value::Object(string_data)) = string_data {
        if !object.get("data").is_some_and(Value::is_object) {
            object["data"] = json!({});
        }
        let data = object["data"].as_object_mut().expect("just made an object");
        for (k, v) in string_data {
            let text = v.as_str().unwrap_or_default();
            data.insert(
                k,
                Value::String(base64::engine::general_purpose::STANDARD.encode(text)),
            );
        }
    }
    if object.get("type").is_none() {
        object["type"] = Value::String("Opaque".into());
    }
}

fn validate_crd(crd: &Value) -> ApiResult<()> {
    let name = meta_str(crd, "name").unwrap_or("");
    let group = crd
        .pointer("/spec/group")
        .and_then(Value::as_str)
        .unwrap_or("");
    let plural = crd
        .pointer("/spec/names/plural")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = crd
        .pointer("/spec/names/kind")
        .and_then(Value::as_str)
        .unwrap_or("");
    let rt = ResourceType::builtin(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        true,
        &[],
    );
    if plural.is_empty() || kind.is_empty() || group.is_empty() {
        return Err(ApiError::invalid(
            &rt,
            name,
            format!(
                "CustomResourceDefinition.apiextensions.k8s.io \"{name}\" is invalid: spec.names.plural, spec.names.kind and spec.group are required"
            ),
        ));
    }
    if name != format!("{plural}.{group}") {
        return Err(ApiError::invalid(
            &rt,
            name,
            format!(
                "CustomResourceDefinition.apiextensions.k8s.io \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
            ),
        ));
    }
    Ok(())
}

/// A CRD's status as the API server reports it once the names are accepted.
fn crd_status(crd: &mut Value) {
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    let since = crd
        .pointer("/metadata/creationTimestamp")
        .cloned()
        .unwrap_or_else(|| Value::String(now_rfc3339()));
    crd["status"] = json!({
        "acceptedNames": names,
        "storedVersions": stored,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": since},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": since}
        ]
    });
}

/// The `managedFields` of an object, read and written as field sets.
#[derive(Clone, Default)]
struct Managed(Vec<ManagedEntry>);

#[derive(Clone)]
struct ManagedEntry {
    manager: String,
    operation: String,
    subresource: Option<String>,
    api_version: String,
    time: String,
    fields: ssa::FieldSet,
}

impl Managed {
    fn load(object: &Value) -> Self {
        let entries = meta(object)
            .and_then(|m| m.get("managedFields"))
            .and_then(Value::as_array)
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| ManagedEntry {
                        manager: e
                            .get("manager")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .into(),
                        operation: e
                            .get("operation")
                            .and_then(Value::as_str)
                            .unwrap_or("Update")
                            .into(),
                        subresource: e
                            .get("subresource")
                            .and_then(Value::as_str)
                            .map(String::from),
                        api_version: e
                            .get("apiVersion")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .into(),
                        time: e.get("time").and_then(Value::as_str).unwrap_or("").into(),
                        fields: e
                            .get("fieldsV1")
                            .map(ssa::from_fields_v1)
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self(entries)
    }

    fn store(&self, object: &mut Value) {
        let entries: Vec<Value> = self
            .0
            .iter()
            .filter(|e| !e.fields.is_empty())
            .map(|e| {
                let mut entry = json!({
                    "manager": e.manager,
                    "operation": e.operation,
                    "apiVersion": e.api_version,
                    "time": e.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": ssa::to_fields_v1(&e.fields),
                });
                if let Some(sub) = &e.subresource {
                    entry["subresource"] = Value::String(sub.clone());
                }
                entry
            })
            .collect();
        let m = meta_mut(object);
        if entries.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(entries));
        }
    }

    fn fields_of(
        &self,
        manager: &str,
        operation: &str,
        subresource: Option<&str>,
    ) -> ssa::FieldSet {
        self.0
            .iter()
            .find(|e| {
                e.manager == manager
                    && e.operation == operation
                    && e.subresource.as_deref() == subresource
            })
            .map(|e| e.fields.clone())
            .unwrap_or_default()
    }

    fn owned_by_other(&self, manager: &str, subresource: Option<&str>, path: &ssa::Path) -> bool {
        self.0.iter().any(|e| {
            !(e.manager == manager
                && e.operation == "Apply"
                && e.subresource.as_deref() == subresource)
                && e.fields.contains(path)
        })
    }

    fn take(
        &mut self,
        manager: &str,
        operation: &str,
        rt: &ResourceType,
        subresource: Option<&str>,
        fields: ssa::FieldSet,
    ) {
        for entry in &mut self.0 {
            if !(entry.manager == manager
                && entry.operation == operation
                && entry.subresource.as_deref() == subresource)
            {
                entry.fields.retain(|p| !fields.contains(p));
            }
        }
        let time = now_rfc3339();
        match self.0.iter_mut().find(|e| {
            e.manager == manager
                && e.operation == operation
                && e.subresource.as_deref() == subresource
        }) {
            Some(entry) => {
                if operation == "Apply" {
                    entry.fields = fields;
                } else {
                    entry.fields.extend(fields);
                }
                entry.time = time;
                entry.api_version = rt.api_version();
            }
            None => self.0.push(ManagedEntry {
                manager: manager.into(),
                operation: operation.into(),
                subresource: subresource.map(String::from),
                api_version: rt.api_version(),
                time,
                fields,
            }),
        }
    }

    fn record_apply(
        &mut self,
        manager: &str,
        rt: &ResourceType,
        subresource: Option<&str>,
        fields: ssa::FieldSet,
    ) {
        self.take(manager, "Apply", rt, subresource, fields);
    }

    fn record_update(
        &mut self,
        manager: &str,
        rt: &ResourceType,
        subresource: Option<&str>,
        fields: ssa::FieldSet,
    ) {
        if !fields.is_empty() {
            self.take(manager, "Update", rt, subresource, fields);
        }
    }
}
