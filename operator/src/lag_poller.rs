//! The lag poller: one loop over the controller's reflector store that reads each StreamConsumer's
//! consumer-group lag on that object's interval, records it in the [`LagBook`], updates the lag
//! metrics, and asks the controller to reconcile the object when the reading matters to it.
//!
//! - Interval: `spec.autoscaling.pollIntervalSeconds` with autoscaling, otherwise
//!   [`PollSettings::default_interval`] (`--lag-interval`, 30 s; off when 0).
//! - A reading triggers a reconciliation (through `Controller::reconcile_on`) when the autoscaler
//!   changes the replica count, when the reading succeeds after a failure or fails after a success
//!   (the `LagAvailable` condition), or when the figures changed and the object's last triggered
//!   reconciliation is at least [`PollSettings::status_interval`] old. So `status.lag` follows the
//!   lag without a status write on every reading.
//! - Readings due together on the same brokers go out as one batch of at most
//!   [`PollSettings::max_batch`] ([`LagReader::read_many`]): they share their Metadata and
//!   ListOffsets requests. At most [`PollSettings::max_concurrent_reads`] batches run at once,
//!   each bounded by [`PollSettings::read_timeout`] (twice that for a batch of several). An object
//!   is never read twice at the same time.
//! - Objects that are gone, being deleted, or no longer read are forgotten: book entry and metric
//!   series.
//!
//! The loop runs only inside the controller, that is only on the leader.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::jiff::Timestamp;
use kube::core::error_boundary::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};
use streamops_crds::v1alpha1::StreamConsumer;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::snake_case;
use crate::lag::{GroupLag, LagError, LagReader, LagTarget};
use crate::lag_book::{key_of, LagBook, LagFailure, LagFigures, Recorded};
use crate::metrics::Metrics;

/// How the controller sees StreamConsumers.
pub type Guarded = DeserializeGuard<StreamConsumer>;

/// Settings of the poller.
#[derive(Debug, Clone, PartialEq)]
pub struct PollSettings {
    /// Interval for StreamConsumers without `spec.autoscaling`; `None`: their lag is not read.
    pub default_interval: Option<Duration>,
    /// Least time between two reconciliations triggered only to refresh `status.lag`.
    pub status_interval: Duration,
    /// Bound on one reading (twice that on a batch of several).
    pub read_timeout: Duration,
    /// Batches of readings in flight at once.
    pub max_concurrent_reads: usize,
    /// Most readings in one batch (readings due together on the same brokers).
    pub max_batch: usize,
    /// Longest sleep between two looks at the store: new objects are read within it.
    pub tick: Duration,
}

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            default_interval: Some(Duration::from_secs(30)),
            status_interval: Duration::from_secs(15),
            read_timeout: Duration::from_secs(20),
            max_concurrent_reads: 4,
            max_batch: 32,
            tick: Duration::from_secs(1),
        }
    }
}

/// How often the lag of `sc` is read, if at all.
pub fn interval_of(sc: &StreamConsumer, settings: &PollSettings) -> Option<Duration> {
    match &sc.spec.autoscaling {
        Some(a) => Some(Duration::from_secs(a.poll_interval_seconds.max(1).into())),
        None => settings.default_interval,
    }
}

/// One reading to start.
#[derive(Debug, Clone)]
pub struct Job {
    /// `namespace/name`.
    pub key: String,
    /// The object, to find it again and to trigger its reconciliation.
    pub object: ObjectRef<Guarded>,
    /// What to read.
    pub target: LagTarget,
}

#[derive(Debug, Clone, Default)]
struct Slot {
    interval: Duration,
    last_start: Option<Instant>,
    in_flight: bool,
    last_trigger: Option<Instant>,
    published: Option<LagFigures>,
}

impl Slot {
    fn due(&self) -> Option<Instant> {
        self.last_start.map(|t| t + self.interval)
    }
}

/// What [`Scheduler::plan`] decided.
#[derive(Debug, Default)]
pub struct Plan {
    /// Readings to start, in batches: each batch's readings are on the same brokers.
    pub batches: Vec<Vec<Job>>,
    /// Keys of objects to forget.
    pub forgotten: Vec<String>,
}

impl Plan {
    /// Every reading to start.
    pub fn jobs(&self) -> Vec<&Job> {
        self.batches.iter().flatten().collect()
    }
}

/// When each object is due, and which readings have triggered what. Pure: time is passed in.
#[derive(Debug, Default)]
pub struct Scheduler {
    slots: HashMap<String, Slot>,
}

impl Scheduler {
    /// The readings to start at `now`, in at most `free` batches of at most
    /// [`PollSettings::max_batch`] readings on the same brokers, and the objects to forget. A
    /// due object that fits no batch waits for the next plan.
    pub fn plan(
        &mut self,
        objects: &[Arc<Guarded>],
        now: Instant,
        settings: &PollSettings,
        free: usize,
    ) -> Plan {
        let mut plan = Plan::default();
        let mut live = HashSet::new();
        for object in objects {
            let Ok(sc) = &object.0 else { continue };
            if sc.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let (Some(key), Some(interval)) = (key_of(sc), interval_of(sc, settings)) else {
                continue;
            };
            live.insert(key.clone());
            let slot = self.slots.entry(key.clone()).or_default();
            slot.interval = interval;
            if slot.in_flight || slot.due().is_some_and(|due| now < due) {
                continue;
            }
            let target = LagTarget::from_resource(sc);
            let open = plan.batches.iter().position(|b| {
                b.len() < settings.max_batch.max(1)
                    && b.first()
                        .is_some_and(|j| j.target.bootstrap_servers == target.bootstrap_servers)
            });
            let batch = match open {
                Some(i) => i,
                None if plan.batches.len() < free => {
                    plan.batches.push(Vec::new());
                    plan.batches.len() - 1
                }
                None => continue,
            };
            slot.in_flight = true;
            slot.last_start = Some(now);
            plan.batches[batch].push(Job {
                key,
                object: ObjectRef::from_obj(object.as_ref()),
                target,
            });
        }
        self.slots.retain(|key, _| {
            let keep = live.contains(key);
            if !keep {
                plan.forgotten.push(key.clone());
            }
            keep
        });
        plan
    }

    /// Whether `key` is still tracked (its reading should be recorded).
    pub fn tracks(&self, key: &str) -> bool {
        self.slots.contains_key(key)
    }

    /// Marks the reading of `key` finished; returns whether the object must be reconciled.
    pub fn finished(
        &mut self,
        key: &str,
        recorded: Option<&Recorded>,
        now: Instant,
        settings: &PollSettings,
    ) -> bool {
        let Some(slot) = self.slots.get_mut(key) else {
            return false;
        };
        slot.in_flight = false;
        let Some(r) = recorded else { return false };
        let figures_due = r.figures.is_some()
            && r.figures != slot.published
            && slot
                .last_trigger
                .is_none_or(|t| now.saturating_duration_since(t) >= settings.status_interval);
        let trigger = r.replicas_changed_from.is_some() || r.availability_changed() || figures_due;
        if trigger {
            slot.last_trigger = Some(now);
            if r.figures.is_some() {
                slot.published = r.figures;
            }
        }
        trigger
    }

    /// When to look again: the earliest due reading, but no later than one tick from `now`, and
    /// one tick from now when no reading can start (`saturated`).
    pub fn next_wake(&self, now: Instant, settings: &PollSettings, saturated: bool) -> Instant {
        let latest = now + settings.tick;
        if saturated {
            return latest;
        }
        self.slots
            .values()
            .filter(|s| !s.in_flight)
            .filter_map(Slot::due)
            .min()
            .map_or(latest, |due| {
                due.clamp(now + Duration::from_millis(10), latest)
            })
    }
}

/// [`LagReader`] behind a pointer (the trait itself is not object safe).
trait ReadLag: Send + Sync {
    fn read_many_boxed<'a>(
        &'a self,
        targets: &'a [LagTarget],
    ) -> BoxFuture<'a, Vec<Result<GroupLag, LagError>>>;
}

impl<R: LagReader> ReadLag for R {
    fn read_many_boxed<'a>(
        &'a self,
        targets: &'a [LagTarget],
    ) -> BoxFuture<'a, Vec<Result<GroupLag, LagError>>> {
        Box::pin(self.read_many(targets))
    }
}

/// The lag poller. Build it with [`LagPoller::new`] and hand it to
/// [`run_controller`](crate::reconcile::run_controller).
pub struct LagPoller {
    reader: Arc<dyn ReadLag>,
    book: Arc<LagBook>,
    metrics: Metrics,
    settings: PollSettings,
}

type Reading = (Job, Result<GroupLag, LagFailure>);

/// What one batch's task returns: each reading with its result.
type Readings = Vec<Reading>;

impl LagPoller {
    /// A poller reading with `reader` into `book` (the same book the reconcile context decides
    /// replicas with).
    pub fn new<R: LagReader>(
        reader: R,
        book: Arc<LagBook>,
        metrics: Metrics,
        settings: PollSettings,
    ) -> Self {
        Self {
            reader: Arc::new(reader),
            book,
            metrics,
            settings,
        }
    }

    /// Reads lag until `stop` is cancelled; sends the objects to reconcile to `trigger`.
    pub async fn run(
        self,
        store: Store<Guarded>,
        trigger: UnboundedSender<ObjectRef<Guarded>>,
        stop: CancellationToken,
    ) {
        info!(
            default_interval = ?self.settings.default_interval,
            "reading consumer-group lag"
        );
        let mut scheduler = Scheduler::default();
        let mut reads: JoinSet<Readings> = JoinSet::new();
        let mut running: HashMap<tokio::task::Id, Vec<String>> = HashMap::new();
        let mut wake = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(wake) => {}
                Some(done) = reads.join_next_with_id(), if !reads.is_empty() => {
                    match done {
                        Ok((id, readings)) => {
                            running.remove(&id);
                            for (job, result) in readings {
                                self.complete(&store, &mut scheduler, &trigger, job, result);
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "a lag reading task failed");
                            for key in running.remove(&e.id()).unwrap_or_default() {
                                scheduler.finished(&key, None, Instant::now(), &self.settings);
                            }
                        }
                    }
                }
            }
            let now = Instant::now();
            let free = self
                .settings
                .max_concurrent_reads
                .saturating_sub(reads.len());
            let plan = scheduler.plan(&store.state(), now, &self.settings, free);
            self.forget(&plan.forgotten, &scheduler);
            for batch in plan.batches {
                let keys = batch.iter().map(|j| j.key.clone()).collect();
                let handle =
                    reads.spawn(read(self.reader.clone(), batch, self.settings.read_timeout));
                running.insert(handle.id(), keys);
            }
            let saturated = reads.len() >= self.settings.max_concurrent_reads;
            wake = scheduler.next_wake(now, &self.settings, saturated);
        }
        reads.abort_all();
        debug!("stopped reading consumer-group lag");
    }

    fn forget(&self, keys: &[String], scheduler: &Scheduler) {
        let mut keys: HashSet<String> = keys.iter().cloned().collect();
        // Also whatever the book holds that the scheduler does not track.
        keys.extend(
            self.book
                .keys()
                .into_iter()
                .filter(|k| !scheduler.tracks(k)),
        );
        for key in keys {
            self.book.forget(&key);
            if let Some((namespace, name)) = key.split_once('/') {
                self.metrics.forget_consumer(namespace, name);
            }
            debug!(object = %key, "no longer reading the lag");
        }
    }

    fn complete(
        &self,
        store: &Store<Guarded>,
        scheduler: &mut Scheduler,
        trigger: &UnboundedSender<ObjectRef<Guarded>>,
        job: Job,
        result: Result<GroupLag, LagFailure>,
    ) {
        let now = Instant::now();
        let current = store.get(&job.object);
        let sc = match current.as_deref() {
            Some(DeserializeGuard(Ok(sc))) if scheduler.tracks(&job.key) => sc,
            _ => {
                scheduler.finished(&job.key, None, now, &self.settings);
                return;
            }
        };
        let recorded = self.book.record(
            sc,
            &job.target,
            result.as_ref().map_err(Clone::clone),
            self.book.elapsed(),
            Timestamp::now(),
        );
        if let Some(r) = &recorded {
            self.observe(sc, &job.key, &result, r);
        }
        if scheduler.finished(&job.key, recorded.as_ref(), now, &self.settings)
            && trigger.send(job.object).is_err()
        {
            debug!(object = %job.key, "the controller is gone; reconciliation not triggered");
        }
    }

    /// Metrics and logs of one recorded reading.
    fn observe(
        &self,
        sc: &StreamConsumer,
        key: &str,
        result: &Result<GroupLag, LagFailure>,
        r: &Recorded,
    ) {
        let (namespace, name) = key.split_once('/').unwrap_or(("", key));
        let labels = [namespace, name];
        let m = &self.metrics;
        match result {
            Ok(lag) => {
                m.consumer_lag.with_label_values(&labels).set(lag.total);
                m.consumer_max_partition_lag
                    .with_label_values(&labels)
                    .set(lag.max_partition_lag);
                m.consumer_members
                    .with_label_values(&labels)
                    .set(lag.members.into());
                m.consumer_lag_read_timestamp
                    .with_label_values(&labels)
                    .set(Timestamp::now().as_second());
                if r.availability_changed() && r.was_available.is_some() {
                    info!(object = %key, total = lag.total, "consumer-group lag readable again");
                }
            }
            Err(failure) => {
                m.lag_read_failures
                    .with_label_values(&[snake_case(failure.reason).as_str()])
                    .inc();
                if r.availability_changed() {
                    warn!(object = %key, reason = failure.reason, error = %failure.message, "cannot read the consumer-group lag");
                } else {
                    debug!(object = %key, reason = failure.reason, error = %failure.message, "cannot read the consumer-group lag");
                }
            }
        }
        match (&r.decision, sc.spec.autoscaling.is_some()) {
            (Some(decision), true) => {
                m.autoscaler_replicas
                    .with_label_values(&labels)
                    .set(decision.replicas.into());
                if let Some(from) = r.replicas_changed_from {
                    m.scale_decisions
                        .with_label_values(&[decision.reason.as_str()])
                        .inc();
                    info!(object = %key, from, to = decision.replicas, reason = decision.reason.as_str(), "{}", decision.message);
                }
            }
            _ => {
                let _ = m.autoscaler_replicas.remove_label_values(&labels);
            }
        }
    }
}

/// Reads one batch, bounded as a whole by `timeout`, twice that for a batch of several readings
/// (the brokers' reader leaves the groups it cannot reach in time for their next turn, see
/// `KafkaLagReader::batch_budget`): a batch that times out fails all its readings with
/// [`LagFailure::timeout`].
async fn read(reader: Arc<dyn ReadLag>, batch: Vec<Job>, timeout: Duration) -> Readings {
    let timeout = if batch.len() > 1 {
        timeout * 2
    } else {
        timeout
    };
    let targets: Vec<LagTarget> = batch.iter().map(|j| j.target.clone()).collect();
    match tokio::time::timeout(timeout, reader.read_many_boxed(&targets)).await {
        Ok(results) if results.len() == batch.len() => batch
            .into_iter()
            .zip(results)
            .map(|(job, r)| (job, r.map_err(|e| LagFailure::from(&e))))
            .collect(),
        Ok(results) => {
            let e = LagError::Task(format!(
                "{} readings came back for {} targets",
                results.len(),
                batch.len()
            ));
            batch
                .into_iter()
                .map(|job| (job, Err(LagFailure::from(&e))))
                .collect()
        }
        Err(_) => batch
            .into_iter()
            .map(|job| (job, Err(LagFailure::timeout(timeout))))
            .collect(),
    }
}

#[cfg(test)]
mod tests;
