//! Watches: the event stream of one resource type, its filter, and bookmarks.

use super::*;

/// `events.k8s.io/v1` Events as the core `v1` API shows them (one store in a real API
/// server): `regarding` becomes `involvedObject`, `note` becomes `message`, and so on.
pub(super) fn mirrored_events(
    store: &Store,
    ns: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Vec<Value> {
    let Some(rt) = store.resolve("events.k8s.io", "v1", "events") else {
        return Vec::new();
    };
    let (items, _) = store.list(&rt, ns, labels, &FieldSelector::default(), None, None);
    items
        .into_iter()
        .map(|e| {
            let time = e
                .get("eventTime")
                .and_then(Value::as_str)
                .map(|t| format!("{}Z", &t[..t.len().min(19)]))
                .map(Value::String)
                .unwrap_or(Value::Null);
            let last = e
                .pointer("/series/lastObservedTime")
                .and_then(Value::as_str)
                .map(|t| Value::String(format!("{}Z", &t[..t.len().min(19)])))
                .unwrap_or_else(|| time.clone());
            let count = e
                .pointer("/series/count")
                .cloned()
                .or_else(|| e.get("deprecatedCount").cloned())
                .unwrap_or(json!(1));
            json!({
                "kind": "Event",
                "apiVersion": "v1",
                "metadata": e.get("metadata").cloned().unwrap_or(json!({})),
                "involvedObject": e.get("regarding").cloned().unwrap_or(json!({})),
                "related": e.get("related").cloned().unwrap_or(Value::Null),
                "reason": e.get("reason").cloned().unwrap_or(Value::Null),
                "message": e.get("note").cloned().unwrap_or(Value::Null),
                "type": e.get("type").cloned().unwrap_or(Value::Null),
                "action": e.get("action").cloned().unwrap_or(Value::Null),
                "source": {"component": e.get("reportingController").cloned().unwrap_or(Value::Null)},
                "reportingComponent": e.get("reportingController").cloned().unwrap_or(Value::Null),
                "reportingInstance": e.get("reportingInstance").cloned().unwrap_or(Value::Null),
                "eventTime": e.get("eventTime").cloned().unwrap_or(Value::Null),
                "firstTimestamp": time,
                "lastTimestamp": last,
                "count": count,
            })
        })
        .filter(|e| fields.matches(e))
        .collect()
}

pub(super) fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": kind, "object": object})).expect("serializes");
    line.push(b'\n');
    Bytes::from(line)
}

pub(super) fn bookmark(rt: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata}),
    )
}

pub(super) struct WatchFilter {
    pub(super) metadata_only: bool,
    pub(super) namespace: Option<String>,
    pub(super) labels: LabelSelector,
    pub(super) fields: FieldSelector,
}

impl WatchFilter {
    pub(super) fn matches(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                != Some(ns.as_str())
        {
            return false;
        }
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// The event a watcher sees for a change: an object that starts or stops matching the
    /// selectors is seen as added or deleted.
    pub(super) fn event(&self, change: &Change) -> Option<Bytes> {
        let now = self.matches(&change.object);
        let before = change.previous.as_deref().map(|p| self.matches(p));
        let kind = match (change.kind, before, now) {
            (ChangeKind::Deleted, _, true) => ChangeKind::Deleted,
            (ChangeKind::Added, _, true) => ChangeKind::Added,
            (ChangeKind::Modified, Some(true), true) => ChangeKind::Modified,
            (ChangeKind::Modified, Some(false) | None, true) => ChangeKind::Added,
            (ChangeKind::Modified, Some(true), false) => ChangeKind::Deleted,
            _ => return None,
        };
        Some(self.line(kind.as_str(), &change.object))
    }

    pub(super) fn line(&self, kind: &str, object: &Value) -> Bytes {
        if self.metadata_only {
            event_line(kind, &partial(object))
        } else {
            event_line(kind, object)
        }
    }
}

pub(super) fn start_watch(
    state: Arc<State>,
    req: &Req,
    rt: Arc<ResourceType>,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
) -> Response<Body> {
    let filter = WatchFilter {
        metadata_only: wants_metadata(req),
        namespace,
        labels,
        fields,
    };
    let requested_rv = req.param("resourceVersion").unwrap_or_default();
    let send_initial = req.param("sendInitialEvents").is_some_and(|s| s == "true");
    let bookmarks = req
        .param("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = req
        .param("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    // Under the store lock: subscribe first, then read the state, so no change falls between.
    let (mut rx, initial, start_rv, gone) = {
        let store = state.store.lock().expect("store lock");
        let rx = store.tx.subscribe();
        let current_rv = store.resource_version();
        let mut initial: Vec<Bytes> = Vec::new();
        let mut gone = false;
        let start_rv;
        if requested_rv.is_empty() || requested_rv == "0" || send_initial {
            let ns = filter.namespace.as_deref();
            let (items, _) = store.list(&rt, ns, &filter.labels, &filter.fields, None, None);
            initial.extend(items.iter().map(|i| filter.line("ADDED", i)));
            if send_initial {
                initial.push(bookmark(&rt, current_rv, true));
            }
            start_rv = current_rv;
        } else {
            match requested_rv
                .parse::<u64>()
                .ok()
                .and_then(|rv| store.changes_since(&rt.key(), rv).map(|c| (rv, c)))
            {
                Some((_, changes)) => {
                    initial.extend(changes.iter().filter_map(|c| filter.event(c)));
                    start_rv = current_rv;
                }
                None => {
                    gone = true;
                    start_rv = current_rv;
                }
            }
        }
        (rx, initial, start_rv, gone)
    };
    let (mut tx, body_rx) = mpsc::channel::<Bytes>(256);
    let mut epoch = state.watch_epoch.subscribe();
    let bookmark_interval = state.config.bookmark_interval;
    tokio::spawn(async move {
        if gone {
            let status = ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {requested_rv}"),
            )
            .to_status();
            let _ = tx.send(event_line("ERROR", &status)).await;
            return;
        }
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(bookmark_interval);
        ticker.tick().await;
        let mut last_rv = start_rv;
        loop {
            tokio::select! {
                received = rx.recv() => match received {
                    Ok(change) => {
                        if change.rv <= start_rv {
                            continue;
                        }
                        last_rv = change.rv;
                        if change.type_key != rt.key() {
                            continue;
                        }
                        if let Some(line) = filter.event(&change)
                            && tx.send(line).await.is_err()
                        {
                            return;
                        }
                    }
                    // A watcher that falls behind is closed; the client resumes or relists.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(bookmark(&rt, last_rv.max(start_rv), false)).await.is_err() {
                        return;
                    }
                }
                _ = &mut deadline => return,
                _ = epoch.changed() => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(http::streamed(body_rx))
        .expect("a valid response")
}
