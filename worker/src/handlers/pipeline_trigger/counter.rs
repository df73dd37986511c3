//! The Redis side of pipeline-trigger: event counting and trigger claims, each one atomic Lua
//! script, so any number of replicas agree on every count and every trigger.
//!
//! Keys of consumer `C` (the `{C}` hash tag keeps them in one Redis Cluster slot):
//!
//! | key | type | content |
//! |---|---|---|
//! | `consumer:{C}:events` | string | events counted in the current window (seed 004's counter) |
//! | `consumer:{C}:state` | hash | `window_start_ms`, `seq` (last claimed trigger), `events_total`, `last_trigger_ms` |
//! | `consumer:{C}:offsets` | hash | `topic:partition` -> last counted offset |
//! | `consumer:{C}:window` | hash | `topic:partition` -> `first:last:events` counted in the current window |
//! | `consumer:{C}:window_traces` | list | JSON `{"traceparent", "tracestate"}` of the current window's first traced events (at most [`MAX_TRIGGER_TRACES`]) |
//! | `consumer:{C}:pending` | hash | `seq` -> trigger JSON, claimed and not yet delivered |
//! | `consumer:{C}:last_trigger` | string | JSON of the last claimed trigger |
//! | `consumer:{C}:lease:<seq>` | string, with TTL | the worker delivering that trigger |
//!
//! Times are Redis server time (`TIME`), so replicas with skewed clocks still agree.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, RedisError, Script};
use tokio::sync::OnceCell;

use super::trigger::{Claimed, TraceContext};
use crate::handlers::Decoded;
use crate::telemetry::MAX_TRIGGER_TRACES;

/// Lua shared by the scripts that claim triggers: the current window's offset range per
/// partition (`win`, loaded from the window hash), `note` to add an event to it, `take_ranges` to
/// hand the ranges to a claimed trigger (and start an empty window), and `save_window` to write
/// it back. Offsets travel as strings: Redis's cjson prints numbers with 14 significant digits.
const WINDOW_LUA: &str = r#"
local function load_window(key)
  local win = {}
  local raw = redis.call('HGETALL', key)
  for k = 1, #raw, 2 do
    local a, b, c = string.match(raw[k + 1], '^(%-?%d+):(%-?%d+):(%d+)$')
    if a then win[raw[k]] = {tonumber(a), tonumber(b), tonumber(c)} end
  end
  return win
end
local function note(win, field, o)
  local r = win[field]
  if r then
    r[2] = o
    r[3] = r[3] + 1
  else
    win[field] = {o, o, 1}
  end
end
local function take_ranges(win)
  local list = {}
  for field, r in pairs(win) do
    local sep = string.find(field, ':[^:]*$')
    list[#list + 1] = {topic = string.sub(field, 1, sep - 1),
      partition = tonumber(string.sub(field, sep + 1)),
      first_offset = string.format('%d', r[1]), last_offset = string.format('%d', r[2]),
      events = r[3]}
  end
  for field in pairs(win) do win[field] = nil end
  return list
end
local function save_window(key, win)
  redis.call('DEL', key)
  for field, r in pairs(win) do
    redis.call('HSET', key, field, string.format('%d:%d:%d', r[1], r[2], r[3]))
  end
end
local function take_traces(key)
  local list = {}
  for _, j in ipairs(redis.call('LRANGE', key, 0, -1)) do
    list[#list + 1] = cjson.decode(j)
  end
  redis.call('DEL', key)
  return list
end
local function encode_trigger(seq, reason, n, start, now, pipeline, ranges, traces)
  local trig = {seq = seq, reason = reason, event_count = n, window_start_ms = start,
    window_end_ms = now, pipeline = pipeline}
  -- cjson writes an empty table as {}: leave the fields out instead.
  if #ranges > 0 then trig.offsets = ranges end
  if #traces > 0 then trig.traces = traces end
  return cjson.encode(trig)
end
"#;

/// Counts a batch's events one by one in offset order, skipping offsets at or below each
/// partition's last counted one (so a replay counts nothing twice), adds each to the current
/// window's offset range of its partition, and claims a trigger each time the window reaches
/// `max_events` (the window's ranges go with it, so consecutive windows split a partition at the
/// exact event), then a time trigger if the window is older than `max_time_ms` and holds events.
/// The trace context of a counted event that has one joins the window's list while it holds
/// fewer than `max_traces`; a claimed trigger takes the list.
///
/// KEYS: events, state, offsets, pending, last_trigger, window, window_traces.
/// ARGV: max_events, max_time_ms, pipeline, max_traces, then per partition: field, n, n offsets
/// (ascending), m, m pairs of offset and trace context JSON.
/// Returns: {new events counted, events now in the window, claimed trigger JSON...}.
const COUNT_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_events = tonumber(ARGV[1])
local max_time = tonumber(ARGV[2])
local pipeline = ARGV[3]
local max_traces = tonumber(ARGV[4])
local win = load_window(KEYS[6])
local ntraces = redis.call('LLEN', KEYS[7])
local start = tonumber(redis.call('HGET', KEYS[2], 'window_start_ms') or '-1')
if start < 0 then
  start = now
  redis.call('HSET', KEYS[2], 'window_start_ms', string.format('%d', now))
end
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
local out = {'', ''}
local function claim(reason, n)
  local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
  local trig = encode_trigger(seq, reason, n, start, now, pipeline, take_ranges(win),
    take_traces(KEYS[7]))
  ntraces = 0
  redis.call('HSET', KEYS[4], tostring(seq), trig)
  redis.call('SET', KEYS[5], trig)
  start = now
  redis.call('HSET', KEYS[2], 'window_start_ms', string.format('%d', now),
    'last_trigger_ms', string.format('%d', now))
  out[#out + 1] = trig
end
local new = 0
local i = 5
while i <= #ARGV do
  local field = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local m = tonumber(ARGV[i + 2 + n])
  local traced = {}
  for k = 0, m - 1 do
    traced[ARGV[i + 3 + n + 2 * k]] = ARGV[i + 4 + n + 2 * k]
  end
  local last = tonumber(redis.call('HGET', KEYS[3], field) or '-1')
  local top = last
  for j = i + 2, i + 1 + n do
    local o = tonumber(ARGV[j])
    if o > top then
      top = o
      new = new + 1
      count = count + 1
      note(win, field, o)
      local tr = traced[ARGV[j]]
      if tr and ntraces < max_traces then
        redis.call('RPUSH', KEYS[7], tr)
        ntraces = ntraces + 1
      end
      if count >= max_events then
        claim('count', count)
        count = 0
      end
    end
  end
  if top > last then
    redis.call('HSET', KEYS[3], field, string.format('%d', top))
  end
  i = i + 3 + n + 2 * m
end
if new > 0 then
  redis.call('HINCRBY', KEYS[2], 'events_total', new)
end
if count > 0 and now - start >= max_time then
  claim('time', count)
  count = 0
end
save_window(KEYS[6], win)
redis.call('SET', KEYS[1], string.format('%d', count))
out[1] = tostring(new)
out[2] = tostring(count)
return out
"#;

/// Claims a time trigger if the window is at least `max_time_ms` old and holds events (or
/// `on_empty` is 1), with the window's offset ranges.
///
/// KEYS: events, state, pending, last_trigger, window, window_traces. ARGV: max_time_ms,
/// on_empty, pipeline.
/// Returns: {claimed trigger JSON or '', milliseconds until the window is due (-1: due, but empty
/// and not triggering; an event will fire it)}.
const TICK_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_time = tonumber(ARGV[1])
local start = tonumber(redis.call('HGET', KEYS[2], 'window_start_ms') or '-1')
if start < 0 then
  redis.call('HSET', KEYS[2], 'window_start_ms', string.format('%d', now))
  return {'', tostring(max_time)}
end
local elapsed = now - start
if elapsed < max_time then
  return {'', tostring(max_time - elapsed)}
end
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count == 0 and ARGV[2] ~= '1' then
  return {'', '-1'}
end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
local win = load_window(KEYS[5])
local trig = encode_trigger(seq, 'time', count, start, now, ARGV[3], take_ranges(win),
  take_traces(KEYS[6]))
redis.call('DEL', KEYS[5])
redis.call('HSET', KEYS[3], tostring(seq), trig)
redis.call('SET', KEYS[4], trig)
redis.call('HSET', KEYS[2], 'window_start_ms', string.format('%d', now),
  'last_trigger_ms', string.format('%d', now))
redis.call('SET', KEYS[1], '0')
return {trig, tostring(max_time)}
"#;

/// Raises the trigger sequence to at least ARGV[1] (after Redis lost its data, so trigger ids
/// already in PostgreSQL are never reused). KEYS: state.
const RAISE_SEQ_LUA: &str = r#"
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local floor = tonumber(ARGV[1])
if seq < floor then
  redis.call('HSET', KEYS[1], 'seq', string.format('%d', floor))
  return 1
end
return 0
"#;

/// Extends a delivery lease if this worker still holds it. KEYS: lease. ARGV: token, ttl_ms.
const RENEW_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Takes the delivery lease of a trigger that is still pending. Checking and taking in one script
/// means a worker working from a stale list of pending triggers cannot deliver one again after
/// another worker finished it. KEYS: pending, lease. ARGV: seq, token, ttl_ms.
const ACQUIRE_LUA: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return 1
end
return 0
"#;

/// Releases a delivery lease if this worker holds it. KEYS: lease. ARGV: token.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Removes a finished trigger from the pending hash and releases its lease, unless another
/// worker holds the lease: this worker's lease expired (a long pause, a slow network) and the
/// other worker took the trigger over, so the outcome is the other worker's to settle. A lease
/// that expired with nobody taking it over does not stop the finish. Returns 1 when finished.
/// KEYS: pending, lease. ARGV: seq, token.
const FINISH_LUA: &str = r#"
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
if holder then
  redis.call('DEL', KEYS[2])
end
return 1
"#;

/// The Redis keys of one consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// Events in the current window.
    pub events: String,
    /// Window state.
    pub state: String,
    /// Counted offsets.
    pub offsets: String,
    /// Offset ranges of the current window.
    pub window: String,
    /// Trace contexts of the current window's first traced events.
    pub window_traces: String,
    /// Claimed, undelivered triggers.
    pub pending: String,
    /// Last claimed trigger.
    pub last_trigger: String,
    prefix: String,
}

impl Keys {
    /// The keys of `consumer_id`.
    pub fn new(consumer_id: &str) -> Self {
        let prefix = format!("consumer:{{{consumer_id}}}");
        Self {
            events: format!("{prefix}:events"),
            state: format!("{prefix}:state"),
            offsets: format!("{prefix}:offsets"),
            window: format!("{prefix}:window"),
            window_traces: format!("{prefix}:window_traces"),
            pending: format!("{prefix}:pending"),
            last_trigger: format!("{prefix}:last_trigger"),
            prefix,
        }
    }

    /// The delivery lease of trigger `seq`.
    pub fn lease(&self, seq: u64) -> String {
        format!("{}:lease:{seq}", self.prefix)
    }
}

/// Result of counting a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    /// Events counted for the first time.
    pub new_events: u64,
    /// Events in the window after the call.
    pub window_events: u64,
    /// Triggers claimed by the call.
    pub claimed: Vec<Claimed>,
}

/// Result of a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticked {
    /// The time trigger claimed, if any.
    pub claimed: Option<Claimed>,
    /// How long until the window is due; `None` when it is due but empty and not triggering.
    pub due_in: Option<Duration>,
}

/// What `/consumer/info` shows from Redis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Events in the current window.
    pub window_events: u64,
    /// Events counted ever.
    pub events_total: u64,
    /// Window start (ms), if a window is open.
    pub window_start_ms: Option<i64>,
    /// Last claimed sequence number.
    pub seq: u64,
    /// Triggers claimed and not yet delivered.
    pub pending: u64,
    /// The last claimed trigger.
    pub last_trigger: Option<Claimed>,
}

/// Errors of the Redis side.
#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    /// Redis failed.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// A script returned something unexpected.
    #[error("unexpected script result: {0}")]
    Protocol(String),
}

fn parse_claimed(json: &str) -> Result<Claimed, CounterError> {
    serde_json::from_str(json)
        .map(Claimed::sorted)
        .map_err(|e| CounterError::Protocol(format!("trigger JSON {json:?}: {e}")))
}

/// A lazily connected, shared Redis connection with the scripts.
pub struct Counter {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    keys: Keys,
    count: Script,
    tick: Script,
    raise: Script,
    acquire: Script,
    renew: Script,
    release: Script,
    finish: Script,
}

impl Counter {
    /// A counter for `consumer_id` on the Redis at `url` (no connection is made yet).
    pub fn new(url: &str, consumer_id: &str) -> Result<Arc<Self>, RedisError> {
        Ok(Arc::new(Self {
            client: redis::Client::open(url)?,
            conn: OnceCell::new(),
            keys: Keys::new(consumer_id),
            count: Script::new(&format!("{WINDOW_LUA}{COUNT_LUA}")),
            tick: Script::new(&format!("{WINDOW_LUA}{TICK_LUA}")),
            raise: Script::new(RAISE_SEQ_LUA),
            acquire: Script::new(ACQUIRE_LUA),
            renew: Script::new(RENEW_LUA),
            release: Script::new(RELEASE_LUA),
            finish: Script::new(FINISH_LUA),
        }))
    }

    /// The consumer's keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The connection, made on first use (and retried on the next call if it fails).
    pub async fn conn(&self) -> Result<ConnectionManager, RedisError> {
        let c = self
            .conn
            .get_or_try_init(|| async {
                // redis 0.32 hands `factor` to its backoff as the growth factor over a 1 s base
                // (default 100, capped at 60 s): left alone, the second reconnect attempt after a
                // Redis restart waits about a minute. Double from 1 s, at most 2 s apart.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Duration::from_secs(5))
                    .set_response_timeout(Duration::from_secs(10))
                    .set_factor(2)
                    .set_max_delay(2000)
                    .set_number_of_retries(2);
                ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await?;
        Ok(c.clone())
    }

    /// Counts `items` (grouped by partition) and claims the triggers they cause. `trace_of`
    /// gives an item's trace context (`None` for an untraced one), kept with the window.
    pub async fn count<T>(
        &self,
        items: &[Decoded<T>],
        max_events: u64,
        max_time_ms: u64,
        pipeline: &str,
        trace_of: impl Fn(&Decoded<T>) -> Option<TraceContext>,
    ) -> Result<Counted, CounterError> {
        type Partition = (Vec<i64>, Vec<(i64, String)>);
        let mut by_partition: std::collections::BTreeMap<(&str, i32), Partition> =
            std::collections::BTreeMap::new();
        for d in items {
            let entry = by_partition
                .entry((&d.pos.topic, d.pos.partition))
                .or_default();
            entry.0.push(d.pos.offset);
            if let Some(json) = trace_of(d).and_then(|t| serde_json::to_string(&t).ok()) {
                entry.1.push((d.pos.offset, json));
            }
        }
        let mut inv = self.count.prepare_invoke();
        inv.key(&self.keys.events)
            .key(&self.keys.state)
            .key(&self.keys.offsets)
            .key(&self.keys.pending)
            .key(&self.keys.last_trigger)
            .key(&self.keys.window)
            .key(&self.keys.window_traces)
            .arg(max_events.max(1))
            .arg(max_time_ms.max(1))
            .arg(pipeline)
            .arg(MAX_TRIGGER_TRACES);
        for ((topic, partition), (offsets, traced)) in by_partition.iter_mut() {
            // The script assigns events to windows in offset order.
            offsets.sort_unstable();
            inv.arg(format!("{topic}:{partition}"))
                .arg(offsets.len())
                .arg(offsets.as_slice())
                .arg(traced.len());
            for (offset, json) in traced.iter() {
                inv.arg(*offset).arg(json.as_str());
            }
        }
        let mut conn = self.conn().await?;
        let out: Vec<String> = inv.invoke_async(&mut conn).await?;
        let number = |i: usize| -> Result<u64, CounterError> {
            out.get(i)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| CounterError::Protocol(format!("count script returned {out:?}")))
        };
        Ok(Counted {
            new_events: number(0)?,
            window_events: number(1)?,
            claimed: out[2..]
                .iter()
                .map(|j| parse_claimed(j))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Claims a time trigger if one is due.
    pub async fn tick(
        &self,
        max_time_ms: u64,
        on_empty: bool,
        pipeline: &str,
    ) -> Result<Ticked, CounterError> {
        let mut conn = self.conn().await?;
        let out: Vec<String> = self
            .tick
            .key(&self.keys.events)
            .key(&self.keys.state)
            .key(&self.keys.pending)
            .key(&self.keys.last_trigger)
            .key(&self.keys.window)
            .key(&self.keys.window_traces)
            .arg(max_time_ms.max(1))
            .arg(if on_empty { "1" } else { "0" })
            .arg(pipeline)
            .invoke_async(&mut conn)
            .await?;
        let (json, due) = match out.as_slice() {
            [j, d] => (j, d),
            _ => {
                return Err(CounterError::Protocol(format!(
                    "tick script returned {out:?}"
                )))
            }
        };
        let due: i64 = due
            .parse()
            .map_err(|_| CounterError::Protocol(format!("tick script returned {out:?}")))?;
        Ok(Ticked {
            claimed: if json.is_empty() {
                None
            } else {
                Some(parse_claimed(json)?)
            },
            due_in: u64::try_from(due).ok().map(Duration::from_millis),
        })
    }

    /// Raises the sequence to at least `floor`. Returns whether it was raised.
    pub async fn raise_seq(&self, floor: u64) -> Result<bool, CounterError> {
        let mut conn = self.conn().await?;
        let raised: i64 = self
            .raise
            .key(&self.keys.state)
            .arg(floor)
            .invoke_async(&mut conn)
            .await?;
        Ok(raised == 1)
    }

    /// Puts a trigger back in the pending hash unless it is there (recovery from PostgreSQL).
    pub async fn restore_pending(&self, t: &Claimed) -> Result<bool, CounterError> {
        let mut conn = self.conn().await?;
        let json = serde_json::to_string(t)
            .map_err(|e| CounterError::Protocol(format!("cannot encode trigger: {e}")))?;
        let added: bool = conn.hset_nx(&self.keys.pending, t.seq, json).await?;
        Ok(added)
    }

    /// The pending triggers, by sequence number.
    pub async fn pending(&self) -> Result<Vec<Claimed>, CounterError> {
        let mut conn = self.conn().await?;
        let all: Vec<(String, String)> = conn.hgetall(&self.keys.pending).await?;
        let mut out = all
            .iter()
            .map(|(_, j)| parse_claimed(j))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|t| t.seq);
        Ok(out)
    }

    /// Takes the delivery lease of trigger `seq` for `ttl` if the trigger is still pending and
    /// nobody holds it.
    pub async fn acquire_lease(
        &self,
        seq: u64,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, CounterError> {
        let mut conn = self.conn().await?;
        let got: i64 = self
            .acquire
            .key(&self.keys.pending)
            .key(self.keys.lease(seq))
            .arg(seq)
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(got == 1)
    }

    /// Extends the lease if still held. Returns whether it is.
    pub async fn renew_lease(
        &self,
        seq: u64,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, CounterError> {
        let mut conn = self.conn().await?;
        let held: i64 = self
            .renew
            .key(self.keys.lease(seq))
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(held == 1)
    }

    /// Releases the lease if held.
    pub async fn release_lease(&self, seq: u64, token: &str) -> Result<(), CounterError> {
        let mut conn = self.conn().await?;
        let _: i64 = self
            .release
            .key(self.keys.lease(seq))
            .arg(token)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Marks trigger `seq` finished (delivered or failed for good). Returns `false`, leaving the
    /// trigger pending, when another worker holds its lease (see `FINISH_LUA`).
    pub async fn finish(&self, seq: u64, token: &str) -> Result<bool, CounterError> {
        let mut conn = self.conn().await?;
        let done: i64 = self
            .finish
            .key(&self.keys.pending)
            .key(self.keys.lease(seq))
            .arg(seq)
            .arg(token)
            .invoke_async(&mut conn)
            .await?;
        Ok(done == 1)
    }

    /// Counters and the last trigger, for `/consumer/info`.
    pub async fn snapshot(&self) -> Result<Snapshot, CounterError> {
        let mut conn = self.conn().await?;
        let (events, state, pending, last): (
            Option<u64>,
            std::collections::HashMap<String, String>,
            u64,
            Option<String>,
        ) = redis::pipe()
            .get(&self.keys.events)
            .hgetall(&self.keys.state)
            .hlen(&self.keys.pending)
            .get(&self.keys.last_trigger)
            .query_async(&mut conn)
            .await?;
        let num = |k: &str| state.get(k).and_then(|v| v.parse::<i64>().ok());
        Ok(Snapshot {
            window_events: events.unwrap_or(0),
            events_total: num("events_total").unwrap_or(0).max(0) as u64,
            window_start_ms: num("window_start_ms"),
            seq: num("seq").unwrap_or(0).max(0) as u64,
            pending,
            last_trigger: last.as_deref().map(parse_claimed).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag_per_consumer() {
        let k = Keys::new("team-a/clicks");
        assert_eq!(k.events, "consumer:{team-a/clicks}:events");
        assert_eq!(k.lease(7), "consumer:{team-a/clicks}:lease:7");
        for key in [
            &k.events,
            &k.state,
            &k.offsets,
            &k.window,
            &k.window_traces,
            &k.pending,
            &k.last_trigger,
        ] {
            assert!(key.contains("{team-a/clicks}"));
        }
    }
}
