//! The emulator's state and the API semantics applied to every write: `resourceVersion` on
//! every change and `409` on a stale one, `generation` that moves only on spec changes, the
//! status subresource kept apart from the main resource, patches, finalizers with
//! `deletionTimestamp`, namespace termination, and CRDs that start serving their resource.

use super::admission::{self, FieldValidation, Refusal};
use super::selectors::{FieldSelector, LabelSelector};
use super::ssa;
use crds::*;
use k8s_openapi::jiff::Timestamp;
use managed::*;
use rand::Rng;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::sync::broadcast;

mod crds;
mod deletes;
mod fields;
mod managed;
mod writes;
use fields::*;

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
    /// The same, compiled for admission.
    pub admission: Option<Arc<admission::Compiled>>,
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
            admission: None,
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

    /// `Kind.group` (or `Kind` for the core group), as error messages name a type.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
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
            "code": self.code,
        });
        if !self.reason.is_empty() {
            status["reason"] = json!(self.reason);
        }
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// An admission refusal as the API server answers it: `400` for fields a strict decode does
/// not know, `422 Invalid` with one cause per field otherwise.
fn refused(rt: &ResourceType, name: &str, refusal: Refusal) -> ApiError {
    match refusal {
        Refusal::UnknownFields(fields) => {
            let listed: Vec<String> = fields
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            ApiError::bad_request(format!(
                "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
                listed.join(", "),
                kind = rt.kind,
                version = rt.version
            ))
        }
        Refusal::Invalid(errors) => {
            let listed: Vec<String> = errors.iter().map(admission::FieldError::message).collect();
            let what = match listed.as_slice() {
                [one] => one.clone(),
                many => format!("[{}]", many.join(", ")),
            };
            let qualified = rt.qualified_kind();
            let causes: Vec<Value> = errors
                .iter()
                .map(|e| json!({"reason": e.reason, "message": e.detail, "field": e.field}))
                .collect();
            let mut error = ApiError::new(
                422,
                "Invalid",
                format!("{qualified} \"{name}\" is invalid: {what}"),
            );
            error.details = Some(json!({
                "name": name, "group": rt.group, "kind": rt.kind, "causes": causes
            }));
            error
        }
    }
}

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
    /// The resourceVersion when the type began to be served: as kube-apiserver's watch cache,
    /// a watch cannot resume from before it.
    since_rv: u64,
}

/// Options of a write.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_manager: Option<String>,
    pub force: bool,
    pub field_validation: FieldValidation,
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
    /// Warnings of the last write (unknown fields dropped), for its answer.
    warnings: Vec<String>,
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
            warnings: Vec::new(),
        };
        for rt in builtin_types() {
            store.register(rt);
        }
        store
    }

    /// The current resourceVersion.
    /// The warnings of the writes since the last call (for the `Warning` headers of an answer).
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

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
        let since_rv = self.rv;
        let entry = self.types.entry(rt.key()).or_insert_with(|| TypeState {
            versions: BTreeMap::new(),
            objects: BTreeMap::new(),
            since_rv,
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
        let since = self.types.get(type_key).map_or(0, |t| t.since_rv);
        if rv < self.compacted_rv || rv < since {
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

    /// The number of objects of `rt` (in `ns`) after `position`.
    pub fn count_after(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        position: &(String, String),
    ) -> usize {
        self.objects(rt)
            .range((
                std::ops::Bound::Excluded(position.clone()),
                std::ops::Bound::Unbounded,
            ))
            .filter(|(key, _)| !rt.namespaced || ns.is_none_or(|n| n == key.0))
            .count()
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
}
