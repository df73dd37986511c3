//! The lag reader's Kafka clients: created once, reused, and bounded.
//!
//! - One client per cluster connection and consumer group, reused by every reading of that group.
//!   (The group is part of the key because librdkafka fetches committed offsets only for its own
//!   `group.id`; the client never joins the group.) A client unused for [`IDLE_AFTER`] is dropped
//!   at the next reading.
//! - At most `max_in_flight` readings run on blocking threads at once. The permit travels with
//!   the blocking work and is released when that work ends, not when the caller stops waiting:
//!   a reading that times out keeps its permit until librdkafka returns (each request is bounded
//!   by the reader's timeout), so timed-out readings cannot pile up threads or clients.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::lag::{LagError, LagTarget};

/// How long an unused client is kept.
pub const IDLE_AFTER: Duration = Duration::from_secs(600);

/// What identifies a client: the connection and the group. Its `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    bootstrap_servers: String,
    group_id: String,
    security_protocol: &'static str,
    sasl_mechanism: Option<&'static str>,
    credentials: Option<(String, String)>,
}

impl ClientKey {
    /// The key of `target`.
    pub fn of(target: &LagTarget) -> Self {
        Self {
            bootstrap_servers: target.bootstrap_servers.clone(),
            group_id: target.group_id.clone(),
            security_protocol: target.security_protocol.as_str(),
            sasl_mechanism: target.sasl_mechanism.map(|m| m.as_str()),
            credentials: target.credentials.clone(),
        }
    }
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .finish_non_exhaustive()
    }
}

struct Slot {
    client: Arc<BaseConsumer>,
    last_used: Instant,
}

/// The clients and the bound on readings in flight.
pub struct LagClients {
    permits: Arc<Semaphore>,
    slots: Mutex<HashMap<ClientKey, Slot>>,
    idle_after: Duration,
}

impl std::fmt::Debug for LagClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LagClients")
            .field("available_permits", &self.permits.available_permits())
            .field("clients", &self.len())
            .finish()
    }
}

impl LagClients {
    /// At most `max_in_flight` readings at once (at least one).
    pub fn new(max_in_flight: usize) -> Self {
        Self::with_idle(max_in_flight, IDLE_AFTER)
    }

    /// Like [`LagClients::new`], dropping clients unused for `idle_after`.
    pub fn with_idle(max_in_flight: usize, idle_after: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
            slots: Mutex::default(),
            idle_after,
        }
    }

    /// Waits for a free reading slot. Hold the permit for as long as the blocking work runs.
    pub async fn permit(&self) -> Result<OwnedSemaphorePermit, LagError> {
        self.permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| LagError::Task(e.to_string()))
    }

    /// Readings that may start now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Clients held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no client is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client of `target`, created with `config` the first time; drops idle clients.
    pub fn client(
        &self,
        target: &LagTarget,
        config: impl FnOnce() -> Result<ClientConfig, LagError>,
    ) -> Result<Arc<BaseConsumer>, LagError> {
        let now = Instant::now();
        let key = ClientKey::of(target);
        let mut slots = self.lock();
        let idle_after = self.idle_after;
        slots.retain(|k, s| *k == key || now.saturating_duration_since(s.last_used) < idle_after);
        if let Some(slot) = slots.get_mut(&key) {
            slot.last_used = now;
            return Ok(slot.client.clone());
        }
        let client: Arc<BaseConsumer> = Arc::new(config()?.create()?);
        slots.insert(
            key,
            Slot {
                client: client.clone(),
                last_used: now,
            },
        );
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamops_crds::v1alpha1::{AutoOffsetReset, SecurityProtocol};

    fn target(group: &str) -> LagTarget {
        LagTarget {
            bootstrap_servers: "127.0.0.1:1".into(),
            group_id: group.into(),
            topics: vec!["t".into()],
            auto_offset_reset: AutoOffsetReset::Earliest,
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            credentials: None,
            ssl_ca_location: None,
            workers: None,
        }
    }

    fn config() -> Result<ClientConfig, LagError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "g")
            .set("log_level", "0");
        Ok(c)
    }

    #[test]
    fn one_client_per_group_is_created_and_reused() {
        let clients = LagClients::new(2);
        let a = clients.client(&target("a"), config).unwrap();
        let again = clients
            .client(&target("a"), || panic!("the client is reused"))
            .unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        let mut other_topics = target("a");
        other_topics.topics = vec!["u".into()];
        let same = clients
            .client(&other_topics, || panic!("topics do not need a new client"))
            .unwrap();
        assert!(Arc::ptr_eq(&a, &same));
        clients.client(&target("b"), config).unwrap();
        assert_eq!(clients.len(), 2);
    }

    #[test]
    fn idle_clients_are_dropped() {
        let clients = LagClients::with_idle(1, Duration::ZERO);
        clients.client(&target("a"), config).unwrap();
        clients.client(&target("b"), config).unwrap();
        assert_eq!(clients.len(), 1, "a was idle when b was read");
    }

    #[tokio::test]
    async fn permits_bound_the_readings_in_flight() {
        let clients = LagClients::new(2);
        let p1 = clients.permit().await.unwrap();
        let _p2 = clients.permit().await.unwrap();
        assert_eq!(clients.available(), 0);
        let waiting = tokio::time::timeout(Duration::from_millis(50), clients.permit()).await;
        assert!(waiting.is_err(), "a third reading waits");
        drop(p1);
        assert_eq!(clients.available(), 1);
    }

    #[test]
    fn the_key_never_shows_the_password() {
        let mut t = target("a");
        t.credentials = Some(("user".into(), "s3cret".into()));
        assert!(!format!("{:?}", ClientKey::of(&t)).contains("s3cret"));
    }
}
