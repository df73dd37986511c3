//! Lag reported by the workers, for StreamConsumers whose brokers the operator may not contact.
//!
//! The operator connects only to the brokers its admin allowed ([`crate::brokers`]). A
//! StreamConsumer that names other brokers still gets its lag: its workers, which connect with
//! their own credentials, report it on their HTTP port (`GET /consumer/lag`, see
//! [`streamops_crds::lag_report`]), and [`WorkerLagReader`] reads those reports:
//!
//! 1. The ready endpoints of the worker Service come from its EndpointSlices, read through the
//!    API (`list` on `discovery.k8s.io/endpointslices`, by the `kubernetes.io/service-name`
//!    label). Only slices the EndpointSlice controller made for that Service count (its
//!    `managed-by` label and a controller reference to a Service of that name): a slice a user
//!    wrote by hand cannot point the operator at another address. The operator reads no Secret
//!    and needs no access to pods or their proxy.
//! 2. Each ready endpoint is asked once, over plain HTTP on the Service's `http` port, with a
//!    timeout, no redirects and no proxy; at most [`MAX_WORKER_ENDPOINTS`] endpoints.
//! 3. Each answer is untrusted input (the StreamConsumer's author controls the worker pods): at
//!    most [`MAX_REPORT_BYTES`] bytes are read, and it is parsed strictly
//!    ([`streamops_crds::lag_report::parse`]: only this StreamConsumer's group and topics,
//!    bounded sizes, no negative offsets). Nothing of the body is ever logged or echoed.
//! 4. The reports are merged per partition (after a rebalance two workers may both report one; the
//!    one further ahead wins) into a [`GroupLag`] whose [`LagSource`] says it came from the
//!    workers. The reading fails unless every ready endpoint answered: a partial sum would
//!    understate the lag and scale down on missing data.
//!
//! What a report can influence: the status and metrics of its own StreamConsumer, and the replica
//! count of that same StreamConsumer, which the autoscaler keeps within its own
//! `minReplicas`..`maxReplicas`. A worker can make its own consumer scale within the bounds its
//! author already chose, nothing more.
//!
//! Limits: with no ready worker (scaled to zero, or none ready yet) there is nothing to read, so a
//! StreamConsumer on a broker the operator may not contact cannot scale up from zero; the
//! `LagAvailable` condition says so. A partition that no worker owns at the moment is not counted.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::Client;
use streamops_crds::lag_report::{self, LagReport, PartitionPosition, MAX_REPORT_BYTES};
use streamops_crds::v1alpha1::AutoOffsetReset;
use streamops_crds::StreamConsumer;

use crate::lag::{summarize, GroupLag, LagError, LagReader, LagSource, LagTarget, PartitionLag};
use crate::names::{workload_name, HTTP_PORT_NAME};

/// Most worker endpoints one reading asks.
pub const MAX_WORKER_ENDPOINTS: usize = 128;

/// Worker reports fetched at once within one reading.
const CONCURRENT_FETCHES: usize = 8;

/// Label of the EndpointSlices of a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label naming what manages an EndpointSlice, and the EndpointSlice controller's value.
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const ENDPOINTSLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// Where the workers of a StreamConsumer report their lag: its namespace and worker Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkersRef {
    /// Namespace.
    pub namespace: String,
    /// The worker Service (named like the workload).
    pub service: String,
}

impl WorkersRef {
    /// The workers of `sc`, if it has a namespace and a name.
    pub fn of(sc: &StreamConsumer) -> Option<Self> {
        Some(Self {
            namespace: sc.metadata.namespace.clone()?,
            service: workload_name(sc.metadata.name.as_deref()?),
        })
    }
}

/// Reads the lag the workers report (see the module notes).
#[derive(Clone)]
pub struct WorkerLagReader {
    client: Client,
    http: reqwest::Client,
}

impl std::fmt::Debug for WorkerLagReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerLagReader").finish_non_exhaustive()
    }
}

impl WorkerLagReader {
    /// A reader listing EndpointSlices with `client`, each worker's answer bounded by `timeout`.
    pub fn new(client: Client, timeout: Duration) -> Result<Self, LagError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| LagError::Task(format!("http client: {e}")))?;
        Ok(Self { client, http })
    }

    /// The ready worker endpoints of `workers`: addresses of ready endpoints in the slices the
    /// EndpointSlice controller made for the Service, on its `http` port.
    pub async fn endpoints(&self, workers: &WorkersRef) -> Result<Vec<SocketAddr>, LagError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &workers.namespace);
        let slices = api
            .list(
                &ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={}", workers.service)),
            )
            .await
            .map_err(|e| LagError::Workers(format!("cannot list the worker endpoints: {e}")))?;
        let mut found = Vec::new();
        for slice in slices.items {
            if !made_for(&slice, &workers.service) {
                tracing::warn!(
                    namespace = %workers.namespace,
                    slice = slice.metadata.name.as_deref().unwrap_or_default(),
                    "ignoring an EndpointSlice not made by the EndpointSlice controller for the worker Service"
                );
                continue;
            }
            let Some(port) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(HTTP_PORT_NAME))
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            for endpoint in &slice.endpoints {
                let conditions = endpoint.conditions.as_ref();
                let ready = conditions.and_then(|c| c.ready) != Some(false)
                    && conditions.and_then(|c| c.terminating) != Some(true);
                if !ready {
                    continue;
                }
                if let Some(ip) = endpoint
                    .addresses
                    .first()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                {
                    found.push(SocketAddr::new(ip, port));
                }
            }
        }
        found.sort();
        found.dedup();
        if found.len() > MAX_WORKER_ENDPOINTS {
            return Err(LagError::Workers(format!(
                "{} worker endpoints, more than the {MAX_WORKER_ENDPOINTS} a reading asks",
                found.len()
            )));
        }
        Ok(found)
    }

    /// Reads the reports of every ready worker of `workers` and merges them into the lag of
    /// `target`'s group.
    pub async fn read_workers(
        &self,
        target: &LagTarget,
        workers: &WorkersRef,
    ) -> Result<GroupLag, LagError> {
        let endpoints = self.endpoints(workers).await?;
        if endpoints.is_empty() {
            return Err(LagError::Workers(
                "no ready worker to report it (a StreamConsumer at zero replicas cannot scale up on lag its workers report)".into(),
            ));
        }
        let reports: Vec<Result<LagReport, LagError>> = futures::stream::iter(endpoints.clone())
            .map(|addr| self.fetch(addr, target))
            .buffer_unordered(CONCURRENT_FETCHES)
            .collect()
            .await;
        let mut ok = Vec::with_capacity(reports.len());
        for report in reports {
            ok.push(report?);
        }
        Ok(merge(&ok, target.auto_offset_reset))
    }

    async fn fetch(&self, addr: SocketAddr, target: &LagTarget) -> Result<LagReport, LagError> {
        let fail = |why: String| LagError::Workers(format!("worker {addr}: {why}"));
        let url = format!("http://{addr}{}", lag_report::LAG_REPORT_PATH);
        let mut response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| fail(describe(&e)))?;
        if !response.status().is_success() {
            return Err(fail(format!(
                "answered HTTP {}",
                response.status().as_u16()
            )));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_REPORT_BYTES as u64)
        {
            return Err(fail(lag_report::ReportError::TooLarge.to_string()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| fail(describe(&e)))? {
            if body.len() + chunk.len() > MAX_REPORT_BYTES {
                return Err(fail(lag_report::ReportError::TooLarge.to_string()));
            }
            body.extend_from_slice(&chunk);
        }
        lag_report::parse(&body, &target.group_id, &target.topics).map_err(|e| fail(e.to_string()))
    }
}

/// What went wrong with a request, without the URL's details beyond the address.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "no answer in time".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else if e.is_body() || e.is_decode() {
        "the answer broke off".into()
    } else {
        "the request failed".into()
    }
}

/// Whether `slice` was made by the EndpointSlice controller for the Service `service`.
fn made_for(slice: &EndpointSlice, service: &str) -> bool {
    let meta = &slice.metadata;
    let labels = meta.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    label(SERVICE_NAME_LABEL) == Some(service)
        && label(MANAGED_BY_LABEL) == Some(ENDPOINTSLICE_CONTROLLER)
        && meta
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "Service" && o.name == service && o.controller == Some(true))
}

/// Merges reports into a group's lag. A partition reported twice (a rebalance in progress)
/// counts once, at the furthest position and the highest watermark reported. A partition whose
/// high watermark is unknown counts as lag 0 *and* as uncommitted, so the autoscaler never takes
/// it for "no work"; one without a stored offset counts from offset 0 under `earliest` (the
/// worker does not know the low watermark: an overestimate, bounded by the high watermark) and as
/// 0 under `latest`.
pub fn merge(reports: &[LagReport], reset: AutoOffsetReset) -> GroupLag {
    let mut parts: HashMap<(&str, i32), PartitionPosition> = HashMap::new();
    for report in reports {
        for p in &report.partitions {
            parts
                .entry((p.topic.as_str(), p.partition))
                .and_modify(|seen| {
                    seen.next_offset = seen.next_offset.max(p.next_offset);
                    seen.high_watermark = seen.high_watermark.max(p.high_watermark);
                })
                .or_insert_with(|| p.clone());
        }
    }
    let per_partition = parts
        .into_values()
        .map(|p| {
            let (committed, lag) = match (p.next_offset, p.high_watermark) {
                (Some(next), Some(high)) => (Some(next), high.saturating_sub(next).max(0)),
                (None, Some(high)) => (
                    None,
                    match reset {
                        AutoOffsetReset::Earliest => high,
                        AutoOffsetReset::Latest => 0,
                    },
                ),
                (_, None) => (None, 0),
            };
            PartitionLag {
                topic: p.topic,
                partition: p.partition,
                committed,
                high_watermark: p.high_watermark.unwrap_or(0),
                lag,
                gap: None,
            }
        })
        .collect();
    let members = i32::try_from(reports.len()).unwrap_or(i32::MAX);
    GroupLag {
        source: LagSource::Workers { reported: members },
        ..summarize(per_partition, members)
    }
}

/// Reads lag from the brokers when the admin allowed them, and from the workers' reports when
/// not (see the module notes).
#[derive(Debug, Clone)]
pub struct BrokersOrWorkers<B> {
    brokers: B,
    workers: Option<WorkerLagReader>,
}

impl<B: LagReader> BrokersOrWorkers<B> {
    /// Brokers through `brokers` (which refuses a broker not allowed with
    /// [`LagError::BrokerNotAllowed`] before connecting); otherwise the workers, with `workers`.
    pub fn new(brokers: B, workers: Option<WorkerLagReader>) -> Self {
        Self { brokers, workers }
    }
}

impl<B: LagReader> BrokersOrWorkers<B> {
    /// The reading of a target whose brokers the admin did not allow (`why`): its workers'
    /// reports, when they can be asked.
    async fn read_from_workers(
        &self,
        target: &LagTarget,
        why: String,
    ) -> Result<GroupLag, LagError> {
        match (&self.workers, &target.workers) {
            (Some(reader), Some(workers)) => {
                reader
                    .read_workers(target, workers)
                    .await
                    .map_err(|e| match e {
                        LagError::Workers(m) => LagError::Workers(format!(
                            "{why}; the workers' own reports could not be read either: {m}"
                        )),
                        other => other,
                    })
            }
            _ => Err(LagError::BrokerNotAllowed(why)),
        }
    }
}

impl<B: LagReader> LagReader for BrokersOrWorkers<B> {
    async fn read(&self, target: &LagTarget) -> Result<GroupLag, LagError> {
        match self.brokers.read(target).await {
            Err(LagError::BrokerNotAllowed(why)) => self.read_from_workers(target, why).await,
            other => other,
        }
    }

    /// The brokers' readings in one batch; the workers of the targets on brokers not allowed are
    /// asked at once, each bounded by the worker reader's own timeout.
    async fn read_many(&self, targets: &[LagTarget]) -> Vec<Result<GroupLag, LagError>> {
        let from_brokers = self.brokers.read_many(targets).await;
        let readings = targets
            .iter()
            .zip(from_brokers)
            .map(|(target, result)| async move {
                match result {
                    Err(LagError::BrokerNotAllowed(why)) => {
                        self.read_from_workers(target, why).await
                    }
                    other => other,
                }
            });
        futures::future::join_all(readings).await
    }
}

#[cfg(test)]
mod tests;
