//! The Event publisher: Events are queued by reconciles and published in order by one task.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::Event as KubeEvent;
use kube::{Api, Client};
use tracing::warn;

/// Who reports Events.
#[derive(Clone)]
pub(super) struct Reporter {
    pub(super) controller: String,
    pub(super) instance: String,
}

/// Publishes queued Events (`events.k8s.io/v1`) in order until every sender is gone. Nothing
/// is cached: Events are published on transitions, so there is little to aggregate, and a
/// cache of every object's last Event would grow with the number of objects.
pub(super) async fn publish_events(
    client: Client,
    reporter: Reporter,
    cluster_events_namespace: String,
    mut queue: tokio::sync::mpsc::Receiver<(KubeEvent, ObjectReference)>,
) {
    use k8s_openapi::api::events::v1::Event;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    while let Some((event, reference)) = queue.recv().await {
        let now = k8s_openapi::jiff::Timestamp::now();
        let namespace = reference
            .namespace
            .clone()
            .unwrap_or_else(|| cluster_events_namespace.clone());
        let name = format!(
            "{}.{:x}",
            reference.name.as_deref().unwrap_or(&reporter.controller),
            now.as_nanosecond()
        );
        let record = Event {
            metadata: kube::api::ObjectMeta {
                name: Some(name),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            action: Some(event.action),
            reason: Some(event.reason),
            note: event.note,
            type_: Some(match event.type_ {
                kube::runtime::events::EventType::Normal => "Normal".into(),
                kube::runtime::events::EventType::Warning => "Warning".into(),
            }),
            event_time: Some(MicroTime(now)),
            regarding: Some(reference),
            reporting_controller: Some(reporter.controller.clone()),
            reporting_instance: Some(reporter.instance.clone()),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
        if let Err(e) = api.create(&kube::api::PostParams::default(), &record).await {
            warn!(error = %e, "could not publish an Event");
        }
    }
}
