//! Leader election with a `coordination.k8s.io/v1` Lease, so two or more replicas are safe:
//! only the holder of the lease runs the controllers. A lease is taken over once it has gone
//! unrenewed for its duration, measured on this process's own clock from the moment it last
//! saw the lease change (clock skew between nodes cannot make it expire early). On shutdown
//! the leader releases the lease so a follower takes over at once.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How to elect.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// A lease not renewed for this long may be taken over.
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_period: Duration,
    /// How often a follower tries to acquire.
    pub retry_period: Duration,
}

/// The lease was lost while leading (another replica holds it, or it could not be renewed in
/// time); the process should exit so it restarts as a follower.
#[derive(Debug, thiserror::Error)]
#[error("lost the leader lease {namespace}/{name}")]
pub struct LeaseLost {
    pub namespace: String,
    pub name: String,
}

/// What an attempt to renew came to.
#[derive(Debug, PartialEq, Eq)]
enum Renewal {
    Renewed,
    /// Another replica holds the lease.
    Lost,
    /// Someone wrote the lease in between (409): not renewed; looked at again next period,
    /// and leadership ends when the lease could expire before then.
    Contended,
}

/// The renewal a write of the lease amounts to.
fn renewal_of(written: Result<(), kube::Error>) -> Result<Renewal, kube::Error> {
    match written {
        Ok(()) => Ok(Renewal::Renewed),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Renewal::Contended),
        Err(e) => Err(e),
    }
}

struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The lease's resourceVersion as last seen, and when.
    observed: Option<(String, Instant)>,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl Elector {
    fn lease_spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(now)),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Tries once to become (or stay) the holder.
    async fn try_acquire(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.lease_spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let takeable = match holder.as_deref() {
            None => true,
            Some(h) if h == self.config.identity => true,
            Some(_) => {
                let duration =
                    Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
                match &self.observed {
                    Some((seen, at)) if *seen == rv => at.elapsed() > duration,
                    _ => {
                        self.observed = Some((rv.clone(), Instant::now()));
                        false
                    }
                }
            }
        };
        if !takeable {
            return Ok(false);
        }
        let mine = holder.as_deref() == Some(self.config.identity.as_str());
        let acquired = if mine {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec =
            Some(self.lease_spec(if mine { transitions } else { transitions + 1 }, acquired));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Renews the lease.
    async fn renew(&mut self) -> Result<Renewal, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(Renewal::Lost);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(Renewal::Lost);
        }
        lease.spec = Some(LeaseSpec {
            renew_time: Some(now()),
            ..spec
        });
        let written = self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await;
        renewal_of(written.map(|_| ()))
    }

    /// Gives the lease up so a follower can take it at once.
    async fn release(&mut self) {
        let result = async {
            let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
                return Ok(());
            };
            let spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            lease.spec = Some(LeaseSpec {
                holder_identity: None,
                renew_time: Some(now()),
                ..spec
            });
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        .await;
        match result {
            Ok(()) => info!(lease = %self.config.name, "released the leader lease"),
            Err(e) => warn!(error = %e, "could not release the leader lease"),
        }
    }
}

/// Runs `work` while this replica holds the lease. Returns `Ok` after `shutdown` (the work
/// finished and the lease was released), or `Err` when leadership was lost: `on_lost` runs
/// at that moment, before the work is asked to stop (so it can fence writes that in-flight
/// work would still make), and the work is then stopped.
pub async fn run_with_leadership<F, Fut>(
    client: Client,
    config: LeaseConfig,
    shutdown: CancellationToken,
    work: F,
    on_lost: impl FnOnce(),
) -> Result<(), LeaseLost>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut elector = Elector {
        api: Api::namespaced(client, &config.namespace),
        config: config.clone(),
        observed: None,
    };
    info!(lease = %config.name, namespace = %config.namespace, identity = %config.identity, "waiting to become the leader");
    loop {
        match elector.try_acquire().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => warn!(error = %e, "could not read or write the leader lease"),
        }
        tokio::select! {
            _ = tokio::time::sleep(config.retry_period) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    info!(identity = %config.identity, "became the leader");
    let stop_work = CancellationToken::new();
    let work = work(stop_work.clone());
    tokio::pin!(work);
    let mut renewed = Instant::now();
    let lost = loop {
        tokio::select! {
            _ = &mut work => break false,
            _ = tokio::time::sleep(config.renew_period) => {
                match elector.renew().await {
                    Ok(Renewal::Renewed) => renewed = Instant::now(),
                    Ok(Renewal::Lost) => break true,
                    Ok(Renewal::Contended) => warn!("the leader lease was written by someone else; not renewed"),
                    Err(e) => warn!(error = %e, "could not renew the leader lease"),
                }
                // Stop before another replica may take over.
                if renewed.elapsed() + config.renew_period >= config.lease_duration {
                    break true;
                }
            }
            _ = shutdown.cancelled() => break false,
        }
    };
    if lost {
        on_lost();
    }
    stop_work.cancel();
    work.await;
    if lost {
        warn!(identity = %config.identity, "lost the leader lease; stopped reconciling (DPC calls were fenced at once)");
        return Err(LeaseLost {
            namespace: config.namespace,
            name: config.name,
        });
    }
    elector.release().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("refused", "Conflict")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn a_conflict_on_renewal_is_not_a_renewal() {
        assert_eq!(renewal_of(Ok(())).unwrap(), Renewal::Renewed);
        assert_eq!(renewal_of(Err(api_error(409))).unwrap(), Renewal::Contended);
        assert!(renewal_of(Err(api_error(500))).is_err());
    }
}
