//! Whether librdkafka can fetch the partitions this worker owns, read from its statistics.
//!
//! After a KRaft broker fence, librdkafka 2.12 can drop the partition leader's broker from its
//! broker list (`Partition t(...)[0]: new leader-1 not found in cache`). The consumer reconnects
//! and reports a broker up, but a partition left delegated to no broker is never fetched again
//! (seen in the chaos suite: one worker fetched nothing for 7.5 minutes). Statistics name the
//! broker each partition is delegated to (`broker`, -1 for none or librdkafka's internal broker),
//! its leader (`leader`, -1 unknown) and each broker's connection state; the stats callback
//! ([`super::context`]) records the verdict per owned partition in [`super::Ownership`], and
//! [`crate::consumer_liveness`] acts on one that stays unfetchable.

use std::collections::BTreeSet;
use std::fmt;

use rdkafka::statistics::Statistics;

use crate::handlers::TopicPartition;

/// One partition as librdkafka's statistics describe it (`topics.<t>.partitions.<p>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionFetch {
    /// The partition.
    pub tp: TopicPartition,
    /// `broker`: the id of the broker it is fetched from; -1 when delegated to no broker (or to
    /// librdkafka's internal one, which fetches nothing).
    pub broker: i32,
    /// `leader`: the leader's broker id as librdkafka last learned it; -1 when unknown.
    pub leader: i32,
    /// `fetch_state`: none, stopping, stopped, offset-query, offset-wait, validate-epoch-wait or
    /// active. A partition paused by the pipeline stays `active` (a pause only sets a flag in
    /// librdkafka), and the states before `active` are passed through on every assignment, so
    /// only one that stays out of `active` (past the watcher's threshold) tells of a wedge.
    pub fetch_state: String,
}

/// Why an owned partition cannot be fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfetchable {
    /// Delegated to no broker.
    NoBroker {
        /// The leader librdkafka knows (-1: none).
        leader: i32,
    },
    /// Delegated to a broker, but the leader is unknown.
    NoLeader {
        /// The broker it is delegated to.
        broker: i32,
    },
    /// Delegated to a broker whose connection is up, with a known leader, but librdkafka is not
    /// fetching it (`fetch_state` is not `active`). Seen in the chaos suite: a partition whose
    /// committed-offset fetch at assignment failed (`NotCoordinator` right after a broker
    /// restart) stayed in `none` for good.
    NotFetching {
        /// The broker it is delegated to.
        broker: i32,
    },
    /// Delegated to a broker whose connection is not up.
    BrokerNotUp {
        /// That broker.
        broker: i32,
    },
}

impl fmt::Display for Unfetchable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoBroker { leader } => {
                write!(f, "delegated to no broker, leader {leader}")
            }
            Self::NoLeader { broker } => {
                write!(f, "leader unknown, delegated to broker {broker}")
            }
            Self::BrokerNotUp { broker } => {
                write!(f, "delegated to broker {broker}, which is not up")
            }
            Self::NotFetching { broker } => {
                write!(
                    f,
                    "delegated to broker {broker}, which is up, but not being fetched"
                )
            }
        }
    }
}

/// The ids of the brokers whose connection is `UP` (bootstrap entries, id -1, left out: no
/// partition is ever delegated to one).
pub fn up_brokers(stats: &Statistics) -> BTreeSet<i32> {
    stats
        .brokers
        .values()
        .filter(|b| b.state == "UP" && b.nodeid >= 0)
        .map(|b| b.nodeid)
        .collect()
}

/// Why `p` cannot be fetched, given the brokers that are up; None when it can.
pub fn why_unfetchable(p: &PartitionFetch, up: &BTreeSet<i32>) -> Option<Unfetchable> {
    if p.broker < 0 {
        Some(Unfetchable::NoBroker { leader: p.leader })
    } else if p.leader < 0 {
        Some(Unfetchable::NoLeader { broker: p.broker })
    } else if !up.contains(&p.broker) {
        Some(Unfetchable::BrokerNotUp { broker: p.broker })
    } else if p.fetch_state != "active" {
        Some(Unfetchable::NotFetching { broker: p.broker })
    } else {
        None
    }
}

/// The verdict for every partition in `parts` that `owned` accepts (the others are not this
/// worker's business: librdkafka reports every partition of a subscribed topic).
pub fn classify<'a>(
    parts: &'a [PartitionFetch],
    up: &BTreeSet<i32>,
    owned: impl Fn(&TopicPartition) -> bool,
) -> Vec<(&'a PartitionFetch, Option<Unfetchable>)> {
    parts
        .iter()
        .filter(|p| owned(&p.tp))
        .map(|p| (p, why_unfetchable(p, up)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use rdkafka::statistics::Broker;

    use super::*;

    fn part(p: i32, broker: i32, leader: i32) -> PartitionFetch {
        PartitionFetch {
            tp: TopicPartition {
                topic: Arc::from("t"),
                partition: p,
            },
            broker,
            leader,
            fetch_state: "active".into(),
        }
    }

    fn up(ids: &[i32]) -> BTreeSet<i32> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_partition_delegated_to_its_up_leader_is_fetchable() {
        assert_eq!(why_unfetchable(&part(0, 1, 1), &up(&[1])), None);
    }

    #[test]
    fn a_partition_on_an_up_leader_that_librdkafka_does_not_fetch_is_unfetchable() {
        for state in ["none", "stopped", "offset-query", "offset-wait"] {
            let p = PartitionFetch {
                fetch_state: state.into(),
                ..part(0, 1, 1)
            };
            assert_eq!(
                why_unfetchable(&p, &up(&[1])),
                Some(Unfetchable::NotFetching { broker: 1 }),
                "{state}"
            );
        }
    }

    #[test]
    fn a_partition_delegated_to_no_broker_is_unfetchable_even_with_a_broker_up() {
        // The chaos suite's wedge: the consumer is connected, the partition has no broker.
        assert_eq!(
            why_unfetchable(&part(0, -1, -1), &up(&[1])),
            Some(Unfetchable::NoBroker { leader: -1 })
        );
        assert_eq!(
            why_unfetchable(&part(0, -1, 1), &up(&[1])),
            Some(Unfetchable::NoBroker { leader: 1 })
        );
    }

    #[test]
    fn a_partition_without_a_known_leader_is_unfetchable() {
        assert_eq!(
            why_unfetchable(&part(0, 2, -1), &up(&[2])),
            Some(Unfetchable::NoLeader { broker: 2 })
        );
    }

    #[test]
    fn a_partition_delegated_to_a_broker_that_is_not_up_is_unfetchable() {
        assert_eq!(
            why_unfetchable(&part(0, 2, 2), &up(&[1, 3])),
            Some(Unfetchable::BrokerNotUp { broker: 2 })
        );
        assert_eq!(
            why_unfetchable(&part(0, 2, 2), &up(&[])),
            Some(Unfetchable::BrokerNotUp { broker: 2 })
        );
    }

    #[test]
    fn only_owned_partitions_are_classified() {
        let parts = vec![part(0, -1, -1), part(1, 1, 1), part(2, -1, -1)];
        let got = classify(&parts, &up(&[1]), |tp| tp.partition != 2);
        let got: Vec<_> = got.iter().map(|(p, v)| (p.tp.partition, *v)).collect();
        assert_eq!(
            got,
            vec![(0, Some(Unfetchable::NoBroker { leader: -1 })), (1, None)]
        );
    }

    #[test]
    fn only_brokers_in_state_up_with_an_id_count_as_up() {
        let broker = |nodeid: i32, state: &str| Broker {
            nodeid,
            state: state.into(),
            ..Default::default()
        };
        let stats = Statistics {
            brokers: HashMap::from([
                ("b1".to_string(), broker(1, "UP")),
                ("b2".to_string(), broker(2, "DOWN")),
                ("b3".to_string(), broker(3, "CONNECT")),
                ("bootstrap".to_string(), broker(-1, "UP")),
            ]),
            ..Default::default()
        };
        assert_eq!(up_brokers(&stats), up(&[1]));
    }

    #[test]
    fn the_reason_names_the_broker_and_leader() {
        assert_eq!(
            Unfetchable::NoBroker { leader: -1 }.to_string(),
            "delegated to no broker, leader -1"
        );
        assert_eq!(
            Unfetchable::BrokerNotUp { broker: 2 }.to_string(),
            "delegated to broker 2, which is not up"
        );
    }
}
