//! Reading the queue's state from Redis into a [`QueueSnapshot`]: the job counts, the
//! counters and their rates, and every worker instance found in Redis.
//!
//! This part takes a plain address, so it can be tested against a local redis-server. The
//! key names are the ones the worker writes (`worker/src/keys.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, RedisConnectionInfo};
use serde::Serialize;

use crate::queue;

/// Prefix of each worker instance's heartbeat key; the key expires unless its worker
/// refreshes it.
pub const HEARTBEAT_KEY_PREFIX: &str = "yametee:workers:";
/// Counter of jobs completed by every worker.
pub const PROCESSED_COUNTER: &str = "yametee:stats:processed";
/// Counter of failed job attempts, rejected jobs included.
pub const FAILED_COUNTER: &str = "yametee:stats:failed";
/// Prefix of the counters of jobs completed in one Unix minute (Unix seconds / 60).
pub const PROCESSED_PER_MINUTE_PREFIX: &str = "yametee:stats:minute:processed:";
/// Prefix of the counters of failed attempts in one Unix minute.
pub const FAILED_PER_MINUTE_PREFIX: &str = "yametee:stats:minute:failed:";

/// Time allowed to open the connection, and to wait for each reply.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys asked for per `SCAN` round trip.
const SCAN_COUNT: usize = 1000;
/// Bound on `SCAN` round trips for one pattern; past it the listing is cut short.
const MAX_SCAN_ROUNDS: usize = 1000;

/// Address the Redis server listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisAddress {
    Tcp {
        host: String,
        port: u16,
    },
    /// A Unix socket, such as the local end of an SSH port forward.
    Unix(PathBuf),
}

impl std::fmt::Display for RedisAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
            RedisAddress::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot connect to Redis at {address}")]
    Connect {
        address: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("reading {item} from Redis failed")]
    Read {
        /// What was being read, such as `the queue length`.
        item: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error("reading the queue from Redis timed out after {} s", .0.as_secs())]
    Timeout(Duration),
}

/// Opens a connection to Redis at `address`, authenticated with `password`.
pub async fn connect(
    address: &RedisAddress,
    password: &str,
) -> Result<MultiplexedConnection, SnapshotError> {
    let addr = match address {
        RedisAddress::Tcp { host, port } => ConnectionAddr::Tcp(host.clone(), *port),
        RedisAddress::Unix(path) => ConnectionAddr::Unix(path.clone()),
    };
    let info = ConnectionInfo {
        addr,
        redis: RedisConnectionInfo {
            password: (!password.is_empty()).then(|| password.to_string()),
            ..RedisConnectionInfo::default()
        },
    };
    let connect_error = |source| SnapshotError::Connect {
        address: address.to_string(),
        source,
    };
    let client = redis::Client::open(info).map_err(connect_error)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(REDIS_TIMEOUT)
        .set_response_timeout(REDIS_TIMEOUT);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(connect_error)
}

/// The queue and its workers at one moment, as Redis stores them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueSnapshot {
    /// The Redis server's time, in milliseconds since the Unix epoch. Ages and rates are
    /// measured on this clock, so the clock of the machine running `status` plays no part.
    pub time_unix_ms: i64,
    pub queue: String,
    pub jobs: JobCounts,
    pub processed: Counter,
    pub failed: Counter,
    /// Seconds the rates are averaged over: the whole previous minute and the elapsed part
    /// of the current one, so from 60 to 120.
    pub rate_window_secs: f64,
    pub workers: Vec<WorkerInstance>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobCounts {
    /// Jobs in the queue list.
    pub waiting: u64,
    /// Jobs in every instance's in-flight list.
    pub in_flight: u64,
    /// Jobs in the retry set.
    pub retry: u64,
    /// Jobs in the dead letter list.
    pub dead: u64,
    /// The job at the head of the queue, the next one a worker takes.
    pub oldest_waiting: Option<WaitingJob>,
}

/// The job at the head of the queue. Producers push onto the tail, so it has waited
/// longest, except a job back from the retry set, which is pushed onto the tail again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WaitingJob {
    pub id: Option<String>,
    pub created_at: Option<String>,
    /// Time since `createdAt`; `None` when the job has no readable `createdAt`.
    pub age_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Counter {
    pub total: u64,
    /// Average per minute over the snapshot's rate window.
    pub per_minute: f64,
}

/// A worker instance (`<worker name>@<host name>`), found by its heartbeat key, its
/// in-flight list, or because a worker host of the inventory runs it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerInstance {
    pub instance: String,
    /// Whether its heartbeat key exists.
    pub alive: bool,
    pub in_flight: u64,
    /// Time left before the heartbeat key expires.
    pub heartbeat_ttl_ms: Option<i64>,
    pub pid: Option<u64>,
    pub started_at: Option<String>,
    pub version: Option<String>,
    pub concurrency: Option<u64>,
}

/// Replies of the counting transaction: queue length, retry set size, dead letter list
/// length, the head job, the two totals, and the previous and current minute's processed
/// and failed counts.
type CountReplies = (
    u64,
    u64,
    u64,
    Option<String>,
    (Option<u64>, Option<u64>),
    (Option<u64>, Option<u64>, Option<u64>, Option<u64>),
);

/// Reads the state of `queue` and its workers. `expected_instances` are instances that
/// should be running; each one is listed, dead when it has no heartbeat.
pub async fn read_snapshot(
    connection: &mut MultiplexedConnection,
    queue: &str,
    expected_instances: &[String],
) -> Result<QueueSnapshot, SnapshotError> {
    let (seconds, micros): (i64, i64) = redis::cmd("TIME")
        .query_async(connection)
        .await
        .map_err(read_error("the server time"))?;
    let time_unix_ms = seconds * 1000 + micros / 1000;
    let minute = seconds.div_euclid(60);

    let retry = format!("{queue}:retry");
    let dead = format!("{queue}:dead");
    // One MULTI transaction, so that the counts belong to one moment.
    let (waiting, retry_count, dead_count, head, totals, minutes): CountReplies = redis::pipe()
        .atomic()
        .llen(queue)
        .zcard(&retry)
        .llen(&dead)
        .lindex(queue, 0)
        .mget(&[PROCESSED_COUNTER, FAILED_COUNTER])
        .mget(&[
            format!("{PROCESSED_PER_MINUTE_PREFIX}{}", minute - 1),
            format!("{PROCESSED_PER_MINUTE_PREFIX}{minute}"),
            format!("{FAILED_PER_MINUTE_PREFIX}{}", minute - 1),
            format!("{FAILED_PER_MINUTE_PREFIX}{minute}"),
        ])
        .query_async(connection)
        .await
        .map_err(read_error("the queue counts"))?;

    // NOTE: workers name the minute by their own clock and this by Redis's. A worker whose
    // clock is off by a few seconds moves that many seconds of counts across the boundary.
    let rate_window_secs = 60.0 + (time_unix_ms - minute * 60_000) as f64 / 1000.0;
    let per_minute = |previous: Option<u64>, current: Option<u64>| {
        let count = previous.unwrap_or(0) + current.unwrap_or(0);
        count as f64 * 60.0 / rate_window_secs
    };
    let processed = Counter {
        total: totals.0.unwrap_or(0),
        per_minute: per_minute(minutes.0, minutes.1),
    };
    let failed = Counter {
        total: totals.1.unwrap_or(0),
        per_minute: per_minute(minutes.2, minutes.3),
    };

    let workers = read_workers(connection, queue, expected_instances).await?;
    let in_flight = workers.iter().map(|worker| worker.in_flight).sum();

    Ok(QueueSnapshot {
        time_unix_ms,
        queue: queue.to_string(),
        jobs: JobCounts {
            waiting,
            in_flight,
            retry: retry_count,
            dead: dead_count,
            oldest_waiting: head.map(|raw| waiting_job(&raw, time_unix_ms)),
        },
        processed,
        failed,
        rate_window_secs,
        workers,
    })
}

/// Lists the instances with a heartbeat or an in-flight list, and the expected ones.
async fn read_workers(
    connection: &mut MultiplexedConnection,
    queue: &str,
    expected_instances: &[String],
) -> Result<Vec<WorkerInstance>, SnapshotError> {
    let heartbeat_keys = scan(
        connection,
        &format!("{}*", escape_glob(HEARTBEAT_KEY_PREFIX)),
    )
    .await?;
    let inflight_prefix = format!("{queue}:inflight:");
    let inflight_keys = scan(connection, &format!("{}*", escape_glob(&inflight_prefix))).await?;

    let mut names: Vec<String> = expected_instances.to_vec();
    names.extend(
        heartbeat_keys
            .iter()
            .filter_map(|key| key.strip_prefix(HEARTBEAT_KEY_PREFIX))
            .map(str::to_string),
    );
    names.extend(
        inflight_keys
            .iter()
            .filter_map(|key| key.strip_prefix(&inflight_prefix))
            .map(str::to_string),
    );
    names.retain(|name| !name.is_empty());
    names.sort();
    names.dedup();

    let mut pipe = redis::pipe();
    for name in &names {
        let heartbeat = format!("{HEARTBEAT_KEY_PREFIX}{name}");
        pipe.get(&heartbeat)
            .pttl(&heartbeat)
            .llen(format!("{inflight_prefix}{name}"));
    }
    let replies: Vec<(Option<String>, i64, u64)> = if names.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(connection)
            .await
            .map_err(read_error("the worker heartbeats"))?
    };

    let mut workers = BTreeMap::new();
    for (name, (heartbeat, ttl_ms, in_flight)) in names.into_iter().zip(replies) {
        workers.insert(
            name.clone(),
            worker_instance(name, heartbeat, ttl_ms, in_flight),
        );
    }
    Ok(workers.into_values().collect())
}

fn worker_instance(
    instance: String,
    heartbeat: Option<String>,
    ttl_ms: i64,
    in_flight: u64,
) -> WorkerInstance {
    let value: Option<serde_json::Value> = heartbeat
        .as_deref()
        .and_then(|text| serde_json::from_str(text).ok());
    let field = |name: &str| value.as_ref().and_then(|value| value.get(name));
    WorkerInstance {
        instance,
        alive: heartbeat.is_some(),
        in_flight,
        // PTTL returns -2 for a missing key and -1 for a key without expiry.
        heartbeat_ttl_ms: (ttl_ms >= 0).then_some(ttl_ms),
        pid: field("pid").and_then(serde_json::Value::as_u64),
        started_at: field("startedAt")
            .and_then(serde_json::Value::as_str)
            .map(String::from),
        version: field("version")
            .and_then(serde_json::Value::as_str)
            .map(String::from),
        concurrency: field("concurrency").and_then(serde_json::Value::as_u64),
    }
}

/// Describes the job `raw` from the head of the queue, aged against `now_unix_ms`.
fn waiting_job(raw: &str, now_unix_ms: i64) -> WaitingJob {
    let document: Option<serde_json::Value> = serde_json::from_str(raw).ok();
    let field = |name: &str| document.as_ref().and_then(|document| document.get(name));
    let created_at = field("createdAt");
    WaitingJob {
        id: field("id").and_then(|id| match id {
            serde_json::Value::String(text) => Some(text.clone()),
            serde_json::Value::Number(number) => Some(number.to_string()),
            _ => None,
        }),
        created_at: created_at.map(|value| match value {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        }),
        age_ms: created_at
            .and_then(queue::parse_created_at)
            .map(|created| (now_unix_ms - created).max(0)),
    }
}

/// Lists the keys matching `pattern`, in at most [`MAX_SCAN_ROUNDS`] round trips.
async fn scan(
    connection: &mut MultiplexedConnection,
    pattern: &str,
) -> Result<Vec<String>, SnapshotError> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    for _ in 0..MAX_SCAN_ROUNDS {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(connection)
            .await
            .map_err(read_error("the key list"))?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
    tracing::warn!(
        pattern,
        "listing keys stopped after {MAX_SCAN_ROUNDS} SCAN round trips; some workers may be missing"
    );
    Ok(keys)
}

/// Escapes the characters that `SCAN MATCH` treats as a pattern.
fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn read_error(item: &'static str) -> impl FnOnce(redis::RedisError) -> SnapshotError {
    move |source| SnapshotError::Read { item, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_job_ages_from_created_at() {
        let job = waiting_job(
            r#"{"id":"j-1","type":"cache:warm","data":{},"createdAt":"2025-01-01T00:00:00.000Z"}"#,
            1_735_689_604_500,
        );
        assert_eq!(job.id.as_deref(), Some("j-1"));
        assert_eq!(job.created_at.as_deref(), Some("2025-01-01T00:00:00.000Z"));
        assert_eq!(job.age_ms, Some(4_500));
    }

    #[test]
    fn waiting_job_without_created_at_has_no_age() {
        let job = waiting_job("not json", 1_000);
        assert_eq!(job.id, None);
        assert_eq!(job.age_ms, None);

        let job = waiting_job(r#"{"id":7,"createdAt":"soon"}"#, 1_000);
        assert_eq!(job.id.as_deref(), Some("7"));
        assert_eq!(job.created_at.as_deref(), Some("soon"));
        assert_eq!(job.age_ms, None);
    }

    #[test]
    fn worker_instance_reads_heartbeat_fields() {
        let worker = worker_instance(
            "w@h".into(),
            Some(r#"{"pid":42,"startedAt":"2025-01-01T00:00:00.000Z","concurrency":4,"version":"0.1.0"}"#.into()),
            12_000,
            3,
        );
        assert!(worker.alive);
        assert_eq!(worker.pid, Some(42));
        assert_eq!(worker.concurrency, Some(4));
        assert_eq!(worker.version.as_deref(), Some("0.1.0"));
        assert_eq!(worker.heartbeat_ttl_ms, Some(12_000));
        assert_eq!(worker.in_flight, 3);
    }

    #[test]
    fn missing_heartbeat_means_dead() {
        let worker = worker_instance("w@h".into(), None, -2, 1);
        assert!(!worker.alive);
        assert_eq!(worker.heartbeat_ttl_ms, None);
        assert_eq!(worker.pid, None);
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(escape_glob("jobs[1]*?"), "jobs\\[1\\]\\*\\?");
        assert_eq!(escape_glob("yametee:jobs"), "yametee:jobs");
    }
}
