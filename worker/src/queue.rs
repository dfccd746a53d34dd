//! The job queue in Redis: fetching, completion, retries, dead letters, heartbeats and
//! the return of jobs left behind by stopped workers.
//!
//! A fetched job moves atomically from the queue to this instance's in-flight list, by
//! `BLMOVE` or by a script that moves a batch. It leaves that list only when it completes,
//! is scheduled for a retry or goes to the dead letter list. A worker that dies mid-job
//! therefore loses nothing: once its heartbeat key expires, a live worker moves its
//! in-flight list back to the queue. The cost is that a job can run twice, which the
//! handlers make harmless.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Direction, RedisResult, Script};
use tracing::warn;

use crate::keys::QueueKeys;

/// How long one `BLMOVE` waits for a job. It bounds how late the fetch loop notices a
/// shutdown, because the fetch loop never cancels a blocking command half-way. A
/// cancelled `BLMOVE` could still move a job that no task then processes.
pub const FETCH_BLOCK_TIMEOUT: Duration = Duration::from_secs(2);
/// Client read timeout of the blocking connection, longer than [`FETCH_BLOCK_TIMEOUT`]
/// so that a `BLMOVE` that found no job is not mistaken for a dead connection.
pub const FETCH_RESPONSE_TIMEOUT: Duration = Duration::from_secs(7);
/// Client read timeout of the connection for every other command.
pub const COMMAND_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed to open a Redis connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Lifetime of a heartbeat key; a worker silent for this long counts as dead.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(15);
/// Interval between heartbeat refreshes, a third of [`HEARTBEAT_TTL`] so that two
/// missed refreshes still leave the key alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Oldest Redis release with `BLMOVE` and `LMOVE`.
pub const MIN_REDIS_VERSION: (u32, u32) = (6, 2);
/// Most due retries moved back to the queue in one step; the rest wait for the next.
const PROMOTE_BATCH: usize = 100;
/// Bound on `SCAN` round trips when looking for in-flight lists.
const MAX_SCAN_ROUNDS: usize = 10_000;

/// Moves every job of an in-flight list (KEYS[1]) to the head of the queue (KEYS[2]) in
/// their original order. With a third key, moves nothing and returns -1 while that
/// heartbeat key exists, so a worker that came back keeps its jobs.
static RETURN_INFLIGHT_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then
  return -1
end
local moved = 0
local length = redis.call('LLEN', KEYS[1])
for _ = 1, length do
  if not redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') then
    break
  end
  moved = moved + 1
end
return moved
",
    )
});

/// Moves up to ARGV[1] jobs from the head of the queue (KEYS[1]) to the tail of the
/// in-flight list (KEYS[2]) and returns them in queue order. A script runs atomically, so
/// no job is ever outside both lists.
static FETCH_BATCH_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local jobs = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #jobs > 0 then
  redis.call('LTRIM', KEYS[1], #jobs, -1)
  redis.call('RPUSH', KEYS[2], unpack(jobs))
end
return jobs
",
    )
});

/// Moves one job (ARGV[1]) from the in-flight list (KEYS[1]) to the head of the queue
/// (KEYS[2]). Returns 1 when moved, 0 when the job was not in the list.
static RETURN_ONE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
",
    )
});

/// Replaces a job (ARGV[1]) of the in-flight list (KEYS[1]) with its retry document
/// (ARGV[2]) in the retry set (KEYS[2]) at the due time (ARGV[3], Unix ms). Returns 0
/// and changes nothing when the job is no longer in flight here.
static SCHEDULE_RETRY_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return 1
",
    )
});

/// Replaces a job (ARGV[1]) of the in-flight list (KEYS[1]) with its dead letter
/// envelope (ARGV[2]) at the tail of the dead letter list (KEYS[2]). Returns 0 and
/// changes nothing when the job is no longer in flight here.
static DEAD_LETTER_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
",
    )
});

/// Moves up to ARGV[2] jobs due by ARGV[1] (Unix ms) from the retry set (KEYS[1]) to the
/// tail of the queue (KEYS[2]). Returns the number moved.
static PROMOTE_DUE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, job in ipairs(due) do
  redis.call('ZREM', KEYS[1], job)
  redis.call('RPUSH', KEYS[2], job)
end
return #due
",
    )
});

/// An `INCRBY` of one counter key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterIncrement {
    pub key: String,
    pub amount: i64,
    /// Lifetime the key gets from this increment on; `None` keeps the key for good.
    pub lifetime: Option<Duration>,
}

/// Whether a job left the in-flight list as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// The job was no longer in this instance's in-flight list: another worker returned
    /// it to the queue, most likely because this one missed its heartbeats.
    NotInFlight,
}

/// Opens a Redis connection that reconnects by itself after a failure.
pub async fn connect(url: &str, response_timeout: Duration) -> RedisResult<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(response_timeout)
        .set_number_of_retries(2)
        .set_factor(100)
        .set_max_delay(2_000);
    client.get_connection_manager_with_config(config).await
}

/// Reason a Redis server cannot serve as the queue.
#[derive(Debug)]
pub enum ServerProblem {
    /// The server did not reply, but it may later.
    Unreachable(redis::RedisError),
    /// The server replied but lacks `BLMOVE`, so waiting will not help.
    TooOld(String),
}

/// Sends `PING` and checks that the server is recent enough for `BLMOVE`.
pub async fn check_server(connection: &mut ConnectionManager) -> Result<(), ServerProblem> {
    let _: String = redis::cmd("PING")
        .query_async(connection)
        .await
        .map_err(ServerProblem::Unreachable)?;

    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(connection)
        .await
        .map_err(ServerProblem::Unreachable)?;

    match parse_redis_version(&info) {
        Some(version) if version < MIN_REDIS_VERSION => Err(ServerProblem::TooOld(format!(
            "Redis {}.{} is too old: the worker needs {}.{} or newer for BLMOVE",
            version.0, version.1, MIN_REDIS_VERSION.0, MIN_REDIS_VERSION.1
        ))),
        _ => Ok(()),
    }
}

/// Reads `redis_version` from the output of `INFO server` as (major, minor).
fn parse_redis_version(info: &str) -> Option<(u32, u32)> {
    let version = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Queue commands that return at once. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct Queue {
    connection: ConnectionManager,
    keys: QueueKeys,
}

impl Queue {
    pub fn new(connection: ConnectionManager, keys: QueueKeys) -> Queue {
        Queue { connection, keys }
    }

    pub fn keys(&self) -> &QueueKeys {
        &self.keys
    }

    /// Returns the connection, for job handlers that write to Redis.
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// Applies each finished job's effect command, when it has one, removes the jobs from
    /// this instance's in-flight list and adds `increments` to counters, in one `MULTI`
    /// transaction and one round trip. Returns, for each job in order, whether it was
    /// still in flight.
    pub async fn complete_batch(
        &mut self,
        jobs: &[(&str, Option<&redis::Cmd>)],
        increments: &[CounterIncrement],
    ) -> RedisResult<Vec<Removal>> {
        let inflight = self.keys.own_inflight();
        let mut transaction = redis::pipe();
        transaction.atomic();
        for (raw, effect) in jobs {
            if let Some(effect) = effect {
                transaction.add_command((*effect).clone()).ignore();
            }
            transaction.lrem(&inflight, 1, *raw);
        }
        for increment in increments {
            transaction.incr(&increment.key, increment.amount).ignore();
            if let Some(lifetime) = increment.lifetime {
                let secs = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
                transaction.expire(&increment.key, secs).ignore();
            }
        }

        let removed: Vec<i64> = transaction.query_async(&mut self.connection).await?;
        Ok(removed.into_iter().map(removal).collect())
    }

    /// Moves a failed job from the in-flight list to the retry set, due at `due_unix_ms`.
    pub async fn schedule_retry(
        &mut self,
        raw: &str,
        document: &str,
        due_unix_ms: i64,
    ) -> RedisResult<Removal> {
        let moved: i64 = SCHEDULE_RETRY_SCRIPT
            .key(self.keys.own_inflight())
            .key(self.keys.retry())
            .arg(raw)
            .arg(document)
            .arg(due_unix_ms)
            .invoke_async(&mut self.connection)
            .await?;
        Ok(removal(moved))
    }

    /// Moves a job from the in-flight list to the dead letter list as `envelope`.
    pub async fn dead_letter(&mut self, raw: &str, envelope: &str) -> RedisResult<Removal> {
        let moved: i64 = DEAD_LETTER_SCRIPT
            .key(self.keys.own_inflight())
            .key(self.keys.dead())
            .arg(raw)
            .arg(envelope)
            .invoke_async(&mut self.connection)
            .await?;
        Ok(removal(moved))
    }

    /// Moves retries that are due by `now_unix_ms` back to the queue and returns how many
    /// moved.
    pub async fn promote_due_retries(&mut self, now_unix_ms: i64) -> RedisResult<usize> {
        PROMOTE_DUE_SCRIPT
            .key(self.keys.retry())
            .key(self.keys.queue())
            .arg(now_unix_ms)
            .arg(PROMOTE_BATCH)
            .invoke_async(&mut self.connection)
            .await
    }

    /// Sets this instance's heartbeat key to `value` for [`HEARTBEAT_TTL`].
    pub async fn beat(&mut self, value: &str) -> RedisResult<()> {
        self.connection
            .set_ex(self.keys.own_heartbeat(), value, HEARTBEAT_TTL.as_secs())
            .await
    }

    /// Deletes this instance's heartbeat key, so that it no longer counts as live.
    pub async fn clear_heartbeat(&mut self) -> RedisResult<()> {
        self.connection.del(self.keys.own_heartbeat()).await
    }

    /// Moves every job of this instance's in-flight list back to the head of the queue
    /// and returns how many moved.
    ///
    /// Only safe when no job of this instance is running: at start, for jobs a previous
    /// run left behind, and at shutdown, for jobs that did not finish in time.
    pub async fn return_own_inflight(&mut self) -> RedisResult<i64> {
        RETURN_INFLIGHT_SCRIPT
            .key(self.keys.own_inflight())
            .key(self.keys.queue())
            .invoke_async(&mut self.connection)
            .await
    }

    /// Moves `raws`, oldest first, from this instance's in-flight list back to the head of
    /// the queue in the same order, and returns how many moved.
    pub async fn return_jobs(&mut self, raws: &[String]) -> RedisResult<usize> {
        let mut moved = 0;
        // Pushing the newest first onto the head leaves the oldest in front.
        for raw in raws.iter().rev() {
            let returned: i64 = RETURN_ONE_SCRIPT
                .key(self.keys.own_inflight())
                .key(self.keys.queue())
                .arg(raw)
                .invoke_async(&mut self.connection)
                .await?;
            moved += usize::try_from(returned).unwrap_or(0);
        }
        Ok(moved)
    }

    /// Returns the jobs of this instance's in-flight list that are not in `running` to the
    /// queue, and returns how many moved.
    ///
    /// After a failed `BLMOVE` the server may have moved a job whose reply was lost; this
    /// finds such jobs. The caller must not fetch while this runs.
    pub async fn return_unclaimed(
        &mut self,
        running: &HashMap<String, usize>,
    ) -> RedisResult<usize> {
        let inflight: Vec<String> = self
            .connection
            .lrange(self.keys.own_inflight(), 0, -1)
            .await?;

        let mut moved = 0;
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for raw in &inflight {
            let count = seen.entry(raw.as_str()).or_default();
            *count += 1;
            if *count <= running.get(raw).copied().unwrap_or(0) {
                continue;
            }
            let returned: i64 = RETURN_ONE_SCRIPT
                .key(self.keys.own_inflight())
                .key(self.keys.queue())
                .arg(raw)
                .invoke_async(&mut self.connection)
                .await?;
            moved += usize::try_from(returned).unwrap_or(0);
        }
        Ok(moved)
    }

    /// Returns the in-flight jobs of workers whose heartbeat key expired to the queue.
    ///
    /// Returns each such instance with the number of jobs moved.
    pub async fn reclaim_from_dead_workers(&mut self) -> RedisResult<Vec<(String, i64)>> {
        let mut reclaimed = Vec::new();
        for key in self.inflight_lists().await? {
            let Some(instance) = self.keys.instance_of_inflight(&key) else {
                continue;
            };
            if instance == self.keys.instance() {
                continue;
            }

            let moved: i64 = RETURN_INFLIGHT_SCRIPT
                .key(&key)
                .key(self.keys.queue())
                .key(self.keys.heartbeat(&instance))
                .invoke_async(&mut self.connection)
                .await?;
            if moved > 0 {
                reclaimed.push((instance, moved));
            }
        }
        Ok(reclaimed)
    }

    async fn inflight_lists(&mut self) -> RedisResult<Vec<String>> {
        let pattern = self.keys.inflight_pattern();
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;

        for _ in 0..MAX_SCAN_ROUNDS {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(200)
                .query_async(&mut self.connection)
                .await?;
            keys.extend(batch);
            if next == 0 {
                keys.sort();
                keys.dedup();
                return Ok(keys);
            }
            cursor = next;
        }

        warn!(
            "Stopped scanning for in-flight lists after {MAX_SCAN_ROUNDS} SCAN calls; \
             the rest are checked next time"
        );
        keys.sort();
        keys.dedup();
        Ok(keys)
    }
}

fn removal(count: i64) -> Removal {
    if count > 0 {
        Removal::Removed
    } else {
        Removal::NotInFlight
    }
}

/// The fetch, on a connection of its own: a blocked command holds its connection, and
/// sharing it would stall every other command behind the wait.
pub struct Fetcher {
    connection: ConnectionManager,
    keys: QueueKeys,
}

impl Fetcher {
    pub fn new(connection: ConnectionManager, keys: QueueKeys) -> Fetcher {
        Fetcher { connection, keys }
    }

    /// Moves up to `max_jobs` jobs to this instance's in-flight list without waiting, and
    /// returns them oldest first; none when the queue is empty.
    pub async fn fetch_batch(&mut self, max_jobs: usize) -> RedisResult<Vec<String>> {
        FETCH_BATCH_SCRIPT
            .key(self.keys.queue())
            .key(self.keys.own_inflight())
            .arg(max_jobs.max(1))
            .invoke_async(&mut self.connection)
            .await
    }

    /// Waits up to [`FETCH_BLOCK_TIMEOUT`] for a job and moves it to this instance's
    /// in-flight list. Returns `None` when the wait ended without a job.
    pub async fn fetch_blocking(&mut self) -> RedisResult<Option<String>> {
        self.connection
            .blmove(
                self.keys.queue(),
                self.keys.own_inflight(),
                Direction::Left,
                Direction::Right,
                FETCH_BLOCK_TIMEOUT.as_secs_f64(),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_version_is_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(parse_redis_version(info), Some((7, 0)));
    }

    #[test]
    fn redis_version_missing_from_info() {
        assert_eq!(parse_redis_version("# Server\r\n"), None);
    }

    #[test]
    fn response_timeout_exceeds_block_timeout() {
        assert!(FETCH_RESPONSE_TIMEOUT > FETCH_BLOCK_TIMEOUT);
    }

    #[test]
    fn heartbeat_is_refreshed_well_before_expiry() {
        assert!(HEARTBEAT_INTERVAL * 2 < HEARTBEAT_TTL);
    }
}
