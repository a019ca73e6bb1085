//! The Event publisher: reconciles queue Events; a dispatcher sends up to
//! [`PUBLISHERS`] of them at once, each tried again on a transient failure.
//!
//! One request at a time was about 25 Events/s on a busy API server: at 10,000 new objects
//! the 4,096-slot queue filled and Events were dropped, and those that were sent arrived
//! seconds after the objects were Ready. Now the queue is small and a full queue makes the
//! reconcile that queues wait for a slot (it holds one of the controller's concurrency
//! slots, though not a DPC slot, so the backlog is bounded by the queue and the publishers
//! in flight, and nothing a user should see is dropped).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Api, Client};
use tokio::sync::Semaphore;
use tracing::warn;

/// Events sent at once.
pub(super) const PUBLISHERS: usize = 16;
/// Events waiting for a publisher before a reconcile that queues one waits.
pub(super) const QUEUE: usize = 256;
/// Attempts per Event (a 5xx, a 429 or a connection failure is tried again).
const ATTEMPTS: u32 = 4;

/// Who reports Events.
#[derive(Clone)]
pub(super) struct Reporter {
    pub(super) controller: String,
    pub(super) instance: String,
}

/// Publishes queued Events (`events.k8s.io/v1`) until every sender is gone. Nothing is
/// cached: Events are published on transitions, so there is little to aggregate, and a cache
/// of every object's last Event would grow with the number of objects.
pub(super) async fn publish_events(
    client: Client,
    reporter: Reporter,
    cluster_events_namespace: String,
    mut queue: tokio::sync::mpsc::Receiver<(KubeEvent, ObjectReference)>,
) {
    let reporter = Arc::new(reporter);
    let slots = Arc::new(Semaphore::new(PUBLISHERS));
    while let Some((event, reference)) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let record = record(&reporter, &cluster_events_namespace, event, reference);
        let client = client.clone();
        tokio::spawn(async move {
            send(client, record).await;
            drop(slot);
        });
    }
}

/// The Event object for `event` about `reference`.
fn record(
    reporter: &Reporter,
    cluster_events_namespace: &str,
    event: KubeEvent,
    reference: ObjectReference,
) -> Event {
    let now = k8s_openapi::jiff::Timestamp::now();
    let namespace = reference
        .namespace
        .clone()
        .unwrap_or_else(|| cluster_events_namespace.to_string());
    let name = format!(
        "{}.{:x}",
        reference.name.as_deref().unwrap_or(&reporter.controller),
        now.as_nanosecond()
    );
    Event {
        metadata: kube::api::ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            ..Default::default()
        },
        action: Some(event.action),
        reason: Some(event.reason),
        note: event.note,
        type_: Some(match event.type_ {
            EventType::Normal => "Normal".into(),
            EventType::Warning => "Warning".into(),
        }),
        event_time: Some(MicroTime(now)),
        regarding: Some(reference),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(reporter.instance.clone()),
        ..Default::default()
    }
}

/// Creates `record`, trying a transient failure again after 0.25 s, 0.5 s and 1 s.
async fn send(client: Client, record: Event) {
    let namespace = record.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(client, &namespace);
    let mut wait = Duration::from_millis(250);
    for attempt in 1..=ATTEMPTS {
        match api.create(&kube::api::PostParams::default(), &record).await {
            Ok(_) => return,
            // The same name was created by an earlier attempt whose answer was lost.
            Err(kube::Error::Api(status)) if status.code == 409 => return,
            Err(e) if attempt < ATTEMPTS && transient(&e) => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => {
                warn!(error = %e, reason = ?record.reason, "could not publish an Event");
                return;
            }
        }
    }
}

/// A failure worth trying again: the API server busy or unreachable, not a refusal.
fn transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}
