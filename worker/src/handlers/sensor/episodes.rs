//! The failure-episode state machine, pure: it turns one machine's readings, in partition order,
//! into database rows. No I/O here; `store` loads the state and writes the plan.
//!
//! Rules (the module docs of `sensor` are the user-facing version):
//! - A reading is *in order* when its timestamp is at or after the machine's `last_seen`, or when
//!   the machine has no state yet. Only in-order readings drive the state machine.
//! - In order, `failure: true`, no open episode: an episode opens, identified by the reading's
//!   position, starting at its timestamp; the reading links to it.
//! - In order, `failure: true`, open episode: the reading links to it.
//! - In order, `failure: false`, open episode: the episode ends at the reading's timestamp; the
//!   healthy reading does not link to it (episodes are half-open intervals `[start, end)`).
//! - In order, `failure: false`, no open episode: nothing happens.
//! - *Late* readings (timestamp before `last_seen`) are stored but change no episode and not
//!   `last_seen`. They link to the machine's episode whose interval contains their timestamp, if
//!   any; `store` resolves that with a query after the batch's episodes are written. The result
//!   does not depend on where batches end: an episode that is open or closed when a late reading
//!   arrives already contains or excludes its timestamp for good, and episodes opened later start
//!   after it.
//! - `first_seen` is the earliest timestamp ever received (late readings included), `last_seen` the
//!   latest.
//! - A reading at or below the machine's last applied offset of the same partition was applied
//!   before (a replay): it is skipped, so replaying committed messages changes nothing.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::reading::Reading;
use crate::handlers::{Decoded, Position};

/// An open failure episode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFailure {
    /// Deterministic id: the position of the reading that opened it (see [`failure_id`]).
    pub id: String,
    /// Timestamp of the reading that opened it.
    pub started_at: DateTime<Utc>,
    /// Position of the reading that opened it.
    pub opened_by: Position,
}

/// What is known about one machine after the readings processed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineState {
    /// Earliest reading timestamp.
    pub first_seen: DateTime<Utc>,
    /// Latest reading timestamp.
    pub last_seen: DateTime<Utc>,
    /// The open episode, if the machine is failing.
    pub open: Option<OpenFailure>,
    /// Position of the last reading applied.
    pub last_applied: Option<Position>,
}

impl MachineState {
    /// Whether the reading at `pos` was applied before.
    fn has_applied(&self, pos: &Position) -> bool {
        self.last_applied.as_ref().is_some_and(|p| {
            p.partition == pos.partition && p.offset >= pos.offset && p.topic == pos.topic
        })
    }
}

/// The id of a failure episode opened by the reading at `pos`: `topic:partition:offset`. Topic
/// names cannot contain `:`, so the id is unambiguous, and it is the same however often the
/// stream is replayed.
pub fn failure_id(pos: &Position) -> String {
    format!("{}:{}:{}", pos.topic, pos.partition, pos.offset)
}

/// How a reading links to an episode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// No episode.
    None,
    /// This episode.
    Failure(String),
    /// A late reading: the episode containing its timestamp, looked up in the database.
    Lookup,
}

/// One `sensor_readings` row to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingRow {
    /// Source position; the primary key.
    pub pos: Position,
    /// Machine.
    pub machine_id: String,
    /// Reading timestamp.
    pub timestamp: DateTime<Utc>,
    /// Sensor values, as a JSON object text.
    pub values: String,
    /// The reading's failure flag.
    pub failure: bool,
    /// Link to an episode.
    pub link: Link,
}

/// One `failures` row to upsert: its final state after the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRow {
    /// Episode id.
    pub id: String,
    /// Machine.
    pub machine_id: String,
    /// Start.
    pub started_at: DateTime<Utc>,
    /// End, once closed.
    pub ended_at: Option<DateTime<Utc>>,
    /// Position of the opening reading.
    pub opened_by: Position,
    /// Position of the closing reading, once closed.
    pub closed_by: Option<Position>,
}

impl FailureRow {
    /// Whether the episode is still open.
    pub fn active(&self) -> bool {
        self.ended_at.is_none()
    }
}

/// Everything one batch writes.
#[derive(Debug, Default)]
pub struct BatchPlan {
    /// Readings, in partition order.
    pub readings: Vec<ReadingRow>,
    /// Episodes opened or closed in the batch, in the order they opened (so, per machine, closed
    /// episodes come before the open one).
    pub failures: Vec<FailureRow>,
    /// Final state of every machine the batch touched.
    pub machines: HashMap<String, MachineState>,
    /// Episodes opened.
    pub opened: u64,
    /// Episodes closed.
    pub closed: u64,
    /// Late readings.
    pub late: u64,
    /// Readings skipped because they were applied before.
    pub replayed: u64,
}

/// Applies a batch's readings, in order, to `states` (which must hold the state of every machine
/// of the batch that has one) and returns the rows to write. `states` ends up holding the new
/// state of each machine of the batch.
pub fn plan_batch(
    states: &mut HashMap<String, MachineState>,
    readings: &[Decoded<Reading>],
) -> BatchPlan {
    let mut plan = BatchPlan::default();
    // Index into plan.failures of each episode touched in this batch.
    let mut touched: HashMap<String, usize> = HashMap::new();
    for d in readings {
        let r = &d.item;
        let ts = r.timestamp;
        if states
            .get(&r.machine_id)
            .is_some_and(|s| s.has_applied(&d.pos))
        {
            plan.replayed += 1;
            continue;
        }
        let link = match states.get_mut(&r.machine_id) {
            Some(state) if ts < state.last_seen => {
                // Late: stored, linked by interval, changes nothing else.
                plan.late += 1;
                if ts < state.first_seen {
                    state.first_seen = ts;
                }
                Link::Lookup
            }
            existing => {
                let state = match existing {
                    Some(s) => {
                        s.last_seen = ts;
                        s
                    }
                    None => states.entry(r.machine_id.clone()).or_insert(MachineState {
                        first_seen: ts,
                        last_seen: ts,
                        open: None,
                        last_applied: None,
                    }),
                };
                match (r.failure, state.open.take()) {
                    (true, None) => {
                        let open = OpenFailure {
                            id: failure_id(&d.pos),
                            started_at: ts,
                            opened_by: d.pos.clone(),
                        };
                        plan.opened += 1;
                        touched.insert(open.id.clone(), plan.failures.len());
                        plan.failures.push(FailureRow {
                            id: open.id.clone(),
                            machine_id: r.machine_id.clone(),
                            started_at: ts,
                            ended_at: None,
                            opened_by: d.pos.clone(),
                            closed_by: None,
                        });
                        let link = Link::Failure(open.id.clone());
                        state.open = Some(open);
                        link
                    }
                    (true, Some(open)) => {
                        let link = Link::Failure(open.id.clone());
                        state.open = Some(open);
                        link
                    }
                    (false, Some(open)) => {
                        plan.closed += 1;
                        let row = FailureRow {
                            id: open.id.clone(),
                            machine_id: r.machine_id.clone(),
                            started_at: open.started_at,
                            ended_at: Some(ts),
                            opened_by: open.opened_by.clone(),
                            closed_by: Some(d.pos.clone()),
                        };
                        match touched.get(&open.id) {
                            Some(&i) => plan.failures[i] = row,
                            None => {
                                touched.insert(open.id.clone(), plan.failures.len());
                                plan.failures.push(row);
                            }
                        }
                        Link::None
                    }
                    (false, None) => Link::None,
                }
            }
        };
        if let Some(s) = states.get_mut(&r.machine_id) {
            s.last_applied = Some(d.pos.clone());
        }
        plan.readings.push(ReadingRow {
            pos: d.pos.clone(),
            machine_id: r.machine_id.clone(),
            timestamp: ts,
            values: r.values.clone(),
            failure: r.failure,
            link,
        });
    }
    // A closed episode that was opened in an earlier batch was pushed when it closed, possibly
    // after an episode of the same machine opened in this batch. Write closed episodes first (the
    // sort is stable), so a machine never has two open episodes, even between two rows.
    plan.failures.sort_by_key(FailureRow::active);
    for d in readings {
        if let Some(s) = states.get(&d.item.machine_id) {
            plan.machines.insert(d.item.machine_id.clone(), s.clone());
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;

    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_710_930_600 + s, 0).unwrap()
    }

    fn reading(offset: i64, machine: &str, ts: i64, failure: bool) -> Decoded<Reading> {
        Decoded {
            pos: Position {
                topic: Arc::from("readings"),
                partition: 0,
                offset,
            },
            timestamp_ms: None,
            item: Reading {
                machine_id: machine.into(),
                timestamp: t(ts),
                values: r#"{"temperature":70.0}"#.into(),
                failure,
            },
        }
    }

    fn links(plan: &BatchPlan) -> Vec<Link> {
        plan.readings.iter().map(|r| r.link.clone()).collect()
    }

    #[test]
    fn first_failing_reading_opens_an_episode_and_first_healthy_one_closes_it() {
        let batch = vec![
            reading(0, "m-7", 0, false),
            reading(1, "m-7", 10, true),
            reading(2, "m-7", 20, true),
            reading(3, "m-7", 30, false),
            reading(4, "m-7", 40, false),
        ];
        let mut states = HashMap::new();
        let plan = plan_batch(&mut states, &batch);
        let id = "readings:0:1".to_string();
        assert_eq!(
            links(&plan),
            vec![
                Link::None,
                Link::Failure(id.clone()),
                Link::Failure(id.clone()),
                Link::None,
                Link::None
            ]
        );
        assert_eq!(plan.failures.len(), 1);
        assert_eq!(plan.failures[0].started_at, t(10));
        assert_eq!(plan.failures[0].ended_at, Some(t(30)));
        assert_eq!(
            plan.failures[0].closed_by.as_ref().map(|p| p.offset),
            Some(3)
        );
        assert_eq!((plan.opened, plan.closed), (1, 1));
        let m = &plan.machines["m-7"];
        assert_eq!(
            (m.first_seen, m.last_seen, m.open.clone()),
            (t(0), t(40), None)
        );
    }

    #[test]
    fn episode_still_failing_at_batch_end_stays_open_and_closes_in_a_later_batch() {
        let mut states = HashMap::new();
        let first = plan_batch(&mut states, &[reading(0, "m-1", 0, true)]);
        assert!(first.failures[0].active());
        let second = plan_batch(
            &mut states,
            &[reading(1, "m-1", 5, true), reading(2, "m-1", 9, false)],
        );
        assert_eq!(links(&second)[0], Link::Failure("readings:0:0".into()));
        assert_eq!(second.failures.len(), 1);
        assert_eq!(second.failures[0].started_at, t(0));
        assert_eq!(second.failures[0].ended_at, Some(t(9)));
        assert_eq!((second.opened, second.closed), (0, 1));
    }

    #[test]
    fn results_do_not_depend_on_where_batches_end() {
        let stream: Vec<_> = (0..40)
            .map(|i| {
                let machine = ["a", "b", "c"][i % 3];
                // Failing in bursts, with some late readings mixed in.
                let ts = if i % 7 == 6 {
                    i as i64 - 5
                } else {
                    i as i64 * 2
                };
                reading(i as i64, machine, ts, (i / 4) % 2 == 1)
            })
            .collect();
        let mut whole_states = HashMap::new();
        let whole = plan_batch(&mut whole_states, &stream);
        for size in [1, 2, 3, 7, 13] {
            let mut states = HashMap::new();
            let mut readings = Vec::new();
            let mut failures: HashMap<String, FailureRow> = HashMap::new();
            for chunk in stream.chunks(size) {
                let p = plan_batch(&mut states, chunk);
                readings.extend(p.readings);
                for f in p.failures {
                    failures.insert(f.id.clone(), f);
                }
            }
            assert_eq!(readings, whole.readings, "batch size {size}");
            let whole_failures: HashMap<_, _> = whole
                .failures
                .iter()
                .map(|f| (f.id.clone(), f.clone()))
                .collect();
            assert_eq!(failures, whole_failures, "batch size {size}");
            assert_eq!(states, whole_states, "batch size {size}");
        }
    }

    #[test]
    fn late_reading_changes_no_episode_and_is_linked_by_lookup() {
        let mut states = HashMap::new();
        let plan = plan_batch(
            &mut states,
            &[
                reading(0, "m", 100, false),
                // Late and failing: does not open an episode.
                reading(1, "m", 50, true),
                reading(2, "m", 110, true),
                // Late and healthy during the episode: does not close it.
                reading(3, "m", 105, false),
                reading(4, "m", 120, true),
            ],
        );
        assert_eq!(
            links(&plan),
            vec![
                Link::None,
                Link::Lookup,
                Link::Failure("readings:0:2".into()),
                Link::Lookup,
                Link::Failure("readings:0:2".into()),
            ]
        );
        assert_eq!(plan.failures.len(), 1);
        assert!(plan.failures[0].active());
        assert_eq!(plan.late, 2);
        let m = &plan.machines["m"];
        assert_eq!((m.first_seen, m.last_seen), (t(50), t(120)));
    }

    #[test]
    fn reading_with_the_same_timestamp_as_the_latest_is_in_order() {
        let mut states = HashMap::new();
        let plan = plan_batch(
            &mut states,
            &[reading(0, "m", 10, true), reading(1, "m", 10, false)],
        );
        assert_eq!(plan.late, 0);
        assert_eq!(plan.failures[0].ended_at, Some(t(10)));
    }

    #[test]
    fn reopened_episode_is_written_after_the_closed_one_of_the_same_machine() {
        let mut states = HashMap::new();
        plan_batch(&mut states, &[reading(0, "m", 0, true)]);
        let plan = plan_batch(
            &mut states,
            &[reading(5, "m", 1, false), reading(6, "m", 2, true)],
        );
        let ids: Vec<_> = plan
            .failures
            .iter()
            .map(|f| (f.id.as_str(), f.active()))
            .collect();
        assert_eq!(ids, vec![("readings:0:0", false), ("readings:0:6", true)]);
    }

    #[test]
    fn replayed_readings_are_skipped_and_change_nothing() {
        let mut states = HashMap::new();
        let batch = vec![
            reading(0, "m", 0, true),
            reading(1, "m", 5, false),
            reading(2, "m", 5, true),
        ];
        plan_batch(&mut states, &batch);
        let before = states.clone();
        let again = plan_batch(&mut states, &batch[1..]);
        assert_eq!(again.replayed, 2);
        assert!(again.readings.is_empty() && again.failures.is_empty());
        assert_eq!(states, before);
        let next = plan_batch(&mut states, &[reading(3, "m", 6, false)]);
        assert_eq!((next.replayed, next.closed), (0, 1));
    }

    #[test]
    fn machines_have_independent_episodes() {
        let mut states = HashMap::new();
        let plan = plan_batch(
            &mut states,
            &[
                reading(0, "a", 0, true),
                reading(1, "b", 0, false),
                reading(2, "b", 1, true),
                reading(3, "a", 2, false),
            ],
        );
        assert_eq!(plan.failures.len(), 2);
        assert!(!plan.failures[0].active());
        assert!(plan.failures[1].active());
        assert!(states["a"].open.is_none());
        assert_eq!(
            states["b"].open.as_ref().map(|o| o.id.as_str()),
            Some("readings:0:2")
        );
    }
}
