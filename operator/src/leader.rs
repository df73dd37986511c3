//! Leader election on a `coordination.k8s.io/v1` Lease (kube 5 ships none).
//!
//! The algorithm is client-go's: a candidate creates the Lease or, when the holder's record has
//! not changed for `leaseDurationSeconds` *as measured on the candidate's own clock* (so clock skew
//! between replicas does not matter), takes it over; the leader renews every `retry_period`. Every
//! write is a create or a resourceVersion-guarded replace, so two candidates never both win. A
//! leader that cannot renew within `renew_deadline` (shorter than the lease duration) stops the
//! controller before anyone else may take over, and the process exits to start afresh.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Where the Lease is and how it is held.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This candidate's identity: the pod name plus a random suffix, unique per process.
    pub holder_identity: String,
    /// How long a lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down. Shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// Interval between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(
        name: impl Into<String>,
        namespace: impl Into<String>,
        holder: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            holder_identity: holder.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Leader-election failures.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// A Lease API call failed.
    #[error("lease API call failed: {0}")]
    Api(#[source] kube::Error),
    /// Another candidate changed the Lease between our read and our write.
    #[error("the lease was changed concurrently")]
    Conflict,
    /// The leader could not renew within the renew deadline, or another candidate holds the lease.
    #[error("lost the leader lease: {0}")]
    Lost(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
}

impl Record {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            holder: spec.and_then(|s| s.holder_identity.clone()),
            renew_time: spec.and_then(|s| s.renew_time.clone()),
            transitions: spec.and_then(|s| s.lease_transitions),
        }
    }
}

/// A candidate's handle on the Lease.
pub struct LeaseLock {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The last record seen and when (on the local clock) it was first seen.
    observed: Option<(Record, Instant)>,
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl LeaseLock {
    /// A lock on the Lease `settings.namespace/settings.name`.
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    fn observe(&mut self, lease: &Lease) {
        let record = Record::of(lease);
        if self.observed.as_ref().map(|(r, _)| r) != Some(&record) {
            self.observed = Some((record, Instant::now()));
        }
    }

    /// One attempt: creates the Lease, renews it if held, or takes it over if the holder's record
    /// has not changed for the holder's lease duration. `Ok(true)`: this candidate is the leader.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaderError> {
        let me = self.settings.holder_identity.clone();
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self
            .api
            .get_opt(&self.settings.name)
            .await
            .map_err(LeaderError::Api)?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(seconds(self.settings.lease_duration)),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => Ok(false),
                Err(e) => Err(LeaderError::Api(e)),
            };
        };
        self.observe(&lease);
        let mut spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(me.as_str());
        if holder.is_some() && !mine {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.settings.lease_duration);
            let seen_at = self
                .observed
                .as_ref()
                .map(|(_, at)| *at)
                .unwrap_or_else(Instant::now);
            if seen_at + duration > Instant::now() {
                return Ok(false);
            }
        }
        if mine {
            spec.renew_time = Some(now);
        } else {
            spec.holder_identity = Some(me);
            spec.acquire_time = Some(now.clone());
            spec.renew_time = Some(now);
            spec.lease_duration_seconds = Some(seconds(self.settings.lease_duration));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        lease.spec = Some(spec);
        // `replace` sends the resourceVersion we read: a concurrent writer makes it fail with 409.
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observe(&updated);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                if mine {
                    Err(LeaderError::Conflict)
                } else {
                    Ok(false)
                }
            }
            Err(e) => Err(LeaderError::Api(e)),
        }
    }

    /// Gives the lease up (if held), so another candidate takes over at once instead of after the
    /// lease duration.
    pub async fn release(&mut self) -> Result<(), LeaderError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.settings.name)
            .await
            .map_err(LeaderError::Api)?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.settings.holder_identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(()),
            Err(e) => Err(LeaderError::Api(e)),
        }
    }
}

/// Waits to become leader, then runs `lead` while renewing the lease.
///
/// - `shutdown` cancelled: `lead`'s stop token is cancelled, `lead` gets up to the renew deadline to
///   finish its reconciliations, the lease is released, `Ok(())`.
/// - lease lost (renewal failing for `renew_deadline`, or another holder): `lead` is dropped at once
///   (in-flight reconciliations are aborted) and `Err(Lost)` is returned; the process should exit.
/// - `lead` returns by itself: the lease is released, `Ok(())`.
pub async fn run_as_leader<F, Fut>(
    lock: &mut LeaseLock,
    metrics: &Metrics,
    shutdown: CancellationToken,
    lead: F,
) -> Result<(), LeaderError>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let settings = lock.settings().clone();
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(settings.retry_period) => {}
            }
        }
        first = false;
        match lock.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => warn!(%error, "cannot acquire the leader lease"),
        }
    }
    info!(lease = %settings.name, holder = %settings.holder_identity, "became the leader");
    metrics.leader.set(1);

    let stop = CancellationToken::new();
    let mut controller = Box::pin(lead(stop.clone()));
    let mut last_renewal = Instant::now();
    let mut ticker = tokio::time::interval_at(
        Instant::now() + settings.retry_period,
        settings.retry_period,
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    enum Exit {
        Shutdown,
        ControllerDone,
        Lost(String),
    }
    let exit = loop {
        tokio::select! {
            _ = &mut controller => break Exit::ControllerDone,
            _ = shutdown.cancelled() => break Exit::Shutdown,
            _ = ticker.tick() => {
                let left = settings.renew_deadline.saturating_sub(last_renewal.elapsed());
                if left.is_zero() {
                    break Exit::Lost(format!("not renewed within {:?}", settings.renew_deadline));
                }
                match tokio::time::timeout(left, lock.try_acquire_or_renew()).await {
                    Ok(Ok(true)) => last_renewal = Instant::now(),
                    Ok(Ok(false)) => break Exit::Lost("another candidate holds the lease".into()),
                    Ok(Err(error)) => warn!(%error, "cannot renew the leader lease"),
                    Err(_) => warn!("renewing the leader lease timed out"),
                }
                if last_renewal.elapsed() >= settings.renew_deadline {
                    break Exit::Lost(format!("not renewed within {:?}", settings.renew_deadline));
                }
            }
        }
    };
    metrics.leader.set(0);
    match exit {
        Exit::Lost(why) => {
            // Dropping the controller aborts its reconciliations before another leader can start.
            drop(controller);
            warn!(%why, "lost the leader lease; stopping the controller");
            Err(LeaderError::Lost(why))
        }
        Exit::Shutdown => {
            stop.cancel();
            if tokio::time::timeout(settings.renew_deadline, &mut controller)
                .await
                .is_err()
            {
                warn!("reconciliations did not finish in time; aborting them");
            }
            release(lock).await;
            Ok(())
        }
        Exit::ControllerDone => {
            release(lock).await;
            Ok(())
        }
    }
}

async fn release(lock: &mut LeaseLock) {
    match lock.release().await {
        Ok(()) => info!("released the leader lease"),
        Err(error) => warn!(%error, "cannot release the leader lease"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{finish, mock_client, path, Expect, Reply};
    use http::Method;
    use prometheus::Registry;
    use serde_json::json;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn lease_path() -> String {
        path("coordination.k8s.io/v1", "leases", "streamops-operator")
    }

    fn settings(me: &str) -> LeaseSettings {
        let mut s = LeaseSettings::new("streamops-operator", "default", me);
        s.lease_duration = Duration::from_secs(15);
        s.renew_deadline = Duration::from_secs(10);
        s.retry_period = Duration::from_secs(2);
        s
    }

    fn lease(holder: &str, rv: &str, renew: &str) -> serde_json::Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "streamops-operator", "namespace": "default", "resourceVersion": rv},
            "spec": {
                "holderIdentity": holder, "leaseDurationSeconds": 15,
                "acquireTime": "2024-01-01T00:00:00.000000Z", "renewTime": renew,
                "leaseTransitions": 3
            }
        })
    }

    fn get(answer: Option<serde_json::Value>) -> Expect {
        let e = Expect::new(Method::GET, lease_path());
        match answer {
            Some(v) => e.reply(Reply::Json(200, v)),
            None => e.reply(Reply::Error(404, "NotFound")),
        }
    }

    #[tokio::test]
    async fn candidate_creates_a_missing_lease_and_leads() {
        let (client, server) = mock_client();
        let mock = server.run_steps(vec![
            get(None),
            Expect::new(Method::POST, path("coordination.k8s.io/v1", "leases", ""))
                .body(json!({"metadata": {"name": "streamops-operator"}, "spec": {"holderIdentity": "me", "leaseDurationSeconds": 15, "leaseTransitions": 0}}))
                .reply(Reply::MergedOverRequest(json!({"metadata": {"resourceVersion": "1"}}))),
        ]);
        let mut lock = LeaseLock::new(client, settings("me"));
        let led = lock.try_acquire_or_renew().await;
        drop(lock);
        finish(mock).await;
        assert!(led.unwrap());
    }

    #[tokio::test]
    async fn leader_renews_with_the_resource_version_it_read() {
        let (client, server) = mock_client();
        let mock = server.run_steps(vec![
            get(Some(lease("me", "7", "2024-01-01T00:00:00.000000Z"))),
            Expect::new(Method::PUT, lease_path())
                .body(json!({"metadata": {"resourceVersion": "7"}, "spec": {"holderIdentity": "me", "leaseTransitions": 3}}))
                .reply(Reply::MergedOverRequest(json!({"metadata": {"resourceVersion": "8"}}))),
        ]);
        let mut lock = LeaseLock::new(client, settings("me"));
        let led = lock.try_acquire_or_renew().await;
        drop(lock);
        let requests = finish(mock).await;
        assert!(led.unwrap());
        assert_ne!(
            requests[1].body["spec"]["renewTime"], "2024-01-01T00:00:00.000000Z",
            "renewTime moves"
        );
    }

    #[tokio::test]
    async fn candidate_does_not_take_a_lease_that_is_being_renewed() {
        let (client, server) = mock_client();
        let mock = server.run_steps(vec![get(Some(lease(
            "other",
            "7",
            "2024-01-01T00:00:00.000000Z",
        )))]);
        let mut lock = LeaseLock::new(client, settings("me"));
        let led = lock.try_acquire_or_renew().await;
        drop(lock);
        finish(mock).await;
        assert!(!led.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn candidate_takes_over_a_lease_unchanged_for_its_duration() {
        let (client, server) = mock_client();
        let stale = lease("other", "7", "2024-01-01T00:00:00.000000Z");
        let mock = server.run_steps(vec![
            get(Some(stale.clone())),
            get(Some(stale)),
            Expect::new(Method::PUT, lease_path())
                .body(json!({"metadata": {"resourceVersion": "7"}, "spec": {"holderIdentity": "me", "leaseTransitions": 4}}))
                .reply(Reply::MergedOverRequest(json!({"metadata": {"resourceVersion": "8"}}))),
        ]);
        let mut lock = LeaseLock::new(client, settings("me"));
        assert!(
            !lock.try_acquire_or_renew().await.unwrap(),
            "first sight: not expired yet"
        );
        tokio::time::advance(Duration::from_secs(16)).await;
        let led = lock.try_acquire_or_renew().await;
        drop(lock);
        finish(mock).await;
        assert!(led.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_record_restarts_the_expiry_clock() {
        let (client, server) = mock_client();
        let mock = server.run_steps(vec![
            get(Some(lease("other", "7", "2024-01-01T00:00:00.000000Z"))),
            get(Some(lease("other", "9", "2024-01-01T00:00:10.000000Z"))),
        ]);
        let mut lock = LeaseLock::new(client, settings("me"));
        assert!(!lock.try_acquire_or_renew().await.unwrap());
        tokio::time::advance(Duration::from_secs(16)).await;
        let led = lock.try_acquire_or_renew().await;
        drop(lock);
        finish(mock).await;
        assert!(!led.unwrap(), "the holder renewed in between");
    }

    #[tokio::test(start_paused = true)]
    async fn losing_the_race_for_an_expired_lease_is_not_leading() {
        let (client, server) = mock_client();
        let stale = lease("other", "7", "2024-01-01T00:00:00.000000Z");
        let mock = server.run_steps(vec![
            get(Some(stale.clone())),
            get(Some(stale)),
            Expect::new(Method::PUT, lease_path()).reply(Reply::Error(409, "Conflict")),
        ]);
        let mut lock = LeaseLock::new(client, settings("me"));
        assert!(!lock.try_acquire_or_renew().await.unwrap());
        tokio::time::advance(Duration::from_secs(16)).await;
        let led = lock.try_acquire_or_renew().await;
        drop(lock);
        finish(mock).await;
        assert!(!led.unwrap());
    }

    #[tokio::test]
    async fn release_clears_the_holder() {
        let (client, server) = mock_client();
        let mock = server.run_steps(vec![
            get(Some(lease("me", "7", "2024-01-01T00:00:00.000000Z"))),
            Expect::new(Method::PUT, lease_path())
                .body(json!({"metadata": {"resourceVersion": "7"}, "spec": {"leaseDurationSeconds": 1}}))
                .reply(Reply::MergedOverRequest(json!({}))),
        ]);
        let mut lock = LeaseLock::new(client, settings("me"));
        let released = lock.release().await;
        drop(lock);
        let requests = finish(mock).await;
        released.unwrap();
        assert!(requests[1].body["spec"]
            .get("holderIdentity")
            .is_none_or(|h| h.is_null()));
    }

    /// A leader whose renewal finds another holder stops its controller at once.
    #[tokio::test(start_paused = true)]
    async fn losing_the_lease_stops_the_controller() {
        let (client, server) = mock_client();
        let mock = server.run_steps(vec![
            get(None),
            Expect::new(Method::POST, path("coordination.k8s.io/v1", "leases", "")).reply(
                Reply::MergedOverRequest(json!({"metadata": {"resourceVersion": "1"}})),
            ),
            // The first renewal finds that someone else holds the lease.
            get(Some(lease("other", "5", "2024-01-01T00:00:00.000000Z"))),
        ]);
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let mut lock = LeaseLock::new(client, settings("me"));
        let started = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicBool::new(false));
        struct OnDrop(Arc<AtomicBool>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let (s, d) = (started.clone(), dropped.clone());
        let result = run_as_leader(
            &mut lock,
            &metrics,
            CancellationToken::new(),
            |_stop| async move {
                let _guard = OnDrop(d);
                s.store(true, Ordering::SeqCst);
                std::future::pending::<()>().await
            },
        )
        .await;
        drop(lock);
        finish(mock).await;
        assert!(matches!(result, Err(LeaderError::Lost(_))), "{result:?}");
        assert!(started.load(Ordering::SeqCst));
        assert!(
            dropped.load(Ordering::SeqCst),
            "the controller future was dropped"
        );
        assert_eq!(metrics.leader.get(), 0);
    }

    /// A leader that cannot reach the API server steps down within the renew deadline.
    #[tokio::test(start_paused = true)]
    async fn failing_renewals_stop_the_controller_within_the_renew_deadline() {
        let (client, server) = mock_client();
        let mut steps = vec![
            get(None),
            Expect::new(Method::POST, path("coordination.k8s.io/v1", "leases", "")).reply(
                Reply::MergedOverRequest(json!({"metadata": {"resourceVersion": "1"}})),
            ),
        ];
        // Renewals at 2, 4, 6 and 8 s fail; at 10 s the deadline has passed.
        for _ in 0..4 {
            steps.push(get(None).reply(Reply::Error(500, "InternalError")));
        }
        let mock = server.run_steps(steps);
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let mut lock = LeaseLock::new(client, settings("me"));
        let began = Instant::now();
        let result = run_as_leader(&mut lock, &metrics, CancellationToken::new(), |_stop| {
            std::future::pending::<()>()
        })
        .await;
        drop(lock);
        finish(mock).await;
        assert!(matches!(result, Err(LeaderError::Lost(_))), "{result:?}");
        assert!(
            began.elapsed() <= Duration::from_secs(11),
            "{:?}",
            began.elapsed()
        );
        assert!(
            began.elapsed() < Duration::from_secs(15),
            "before the lease can expire for others"
        );
    }

    /// On shutdown the controller is asked to stop, then the lease is released.
    #[tokio::test]
    async fn shutdown_stops_the_controller_then_releases_the_lease() {
        let (client, server) = mock_client();
        let mock = server.run_steps(vec![
            get(None),
            Expect::new(Method::POST, path("coordination.k8s.io/v1", "leases", "")).reply(
                Reply::MergedOverRequest(json!({"metadata": {"resourceVersion": "1"}})),
            ),
            get(Some(lease("me", "1", "2024-01-01T00:00:00.000000Z"))),
            Expect::new(Method::PUT, lease_path()).reply(Reply::MergedOverRequest(json!({}))),
        ]);
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let mut lock = LeaseLock::new(client, settings("me"));
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        let result = run_as_leader(&mut lock, &metrics, shutdown, |stop| async move {
            trigger.cancel();
            stop.cancelled().await;
        })
        .await;
        drop(lock);
        finish(mock).await;
        result.unwrap();
    }
}
