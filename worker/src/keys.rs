//! Names of the Redis keys the worker reads and writes.
//!
//! The job lists and sets (queue, in-flight lists, retry set, dead letter list, cache
//! entries) are named after the queue list, so two deployments with different
//! `QUEUE_NAME` values keep their jobs apart in one Redis. Heartbeats, counters and probe
//! results have fixed names, because the deploy tool's `status` and `verify` read them
//! without knowing the queue name.

/// Prefix of the key a `verify:probe` job writes.
pub const PROBE_KEY_PREFIX: &str = "yametee:probe:";
/// Prefix of the heartbeat key of each worker instance.
pub const HEARTBEAT_KEY_PREFIX: &str = "yametee:workers:";
/// Counter of jobs completed, by every worker; `<key>:<job type>` counts one type.
pub const PROCESSED_COUNTER: &str = "yametee:stats:processed";
/// Counter of failed job attempts, rejected jobs included; `<key>:<job type>` counts one
/// known type.
pub const FAILED_COUNTER: &str = "yametee:stats:failed";
/// Prefix of the per-minute counters of completed jobs, `<prefix><unix minute>`, where
/// the Unix minute is the Unix time in seconds divided by 60 on the worker's clock.
pub const PROCESSED_PER_MINUTE_PREFIX: &str = "yametee:stats:minute:processed:";
/// Prefix of the per-minute counters of failed attempts, `<prefix><unix minute>`.
pub const FAILED_PER_MINUTE_PREFIX: &str = "yametee:stats:minute:failed:";
/// Lifetime of a per-minute counter after its last increment. `status` reads only the
/// current and the previous minute, so an hour leaves room for reading by hand.
pub const PER_MINUTE_COUNTER_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Key names for one queue, seen from one worker instance.
#[derive(Debug, Clone)]
pub struct QueueKeys {
    queue: String,
    instance: String,
}

impl QueueKeys {
    /// Creates the key names for `queue` as seen by the worker instance `instance`
    /// (`<worker name>@<host name>`).
    pub fn new(queue: &str, instance: &str) -> QueueKeys {
        QueueKeys {
            queue: queue.to_string(),
            instance: instance.to_string(),
        }
    }

    /// Returns the list producers push jobs onto.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Returns this worker's instance name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Returns the list holding the jobs this instance has taken and not yet finished.
    pub fn own_inflight(&self) -> String {
        self.inflight(&self.instance)
    }

    /// Returns the in-flight list of any worker instance.
    pub fn inflight(&self, instance: &str) -> String {
        format!("{}:inflight:{instance}", self.queue)
    }

    /// Returns the `SCAN MATCH` pattern that finds every instance's in-flight list.
    pub fn inflight_pattern(&self) -> String {
        format!("{}:inflight:*", escape_glob(&self.queue))
    }

    /// Returns the instance name that an in-flight list key belongs to, or `None` when
    /// the key is not an in-flight list of this queue.
    pub fn instance_of_inflight(&self, key: &str) -> Option<String> {
        key.strip_prefix(&self.queue)
            .and_then(|rest| rest.strip_prefix(":inflight:"))
            .filter(|instance| !instance.is_empty())
            .map(str::to_string)
    }

    /// Returns this instance's heartbeat key.
    pub fn own_heartbeat(&self) -> String {
        self.heartbeat(&self.instance)
    }

    /// Returns the heartbeat key of any worker instance. The key expires unless its
    /// worker refreshes it, and its absence marks the instance as dead.
    ///
    /// NOTE: the key does not name the queue. Two workers with the same instance name (the
    /// same `WORKER_NAME` on one host) must therefore not serve different queues of one
    /// Redis, because each would keep the other's heartbeat alive and the first to stop
    /// would delete it.
    pub fn heartbeat(&self, instance: &str) -> String {
        format!("{HEARTBEAT_KEY_PREFIX}{instance}")
    }

    /// Returns the sorted set of jobs waiting for a retry, scored by due time in Unix
    /// milliseconds.
    pub fn retry(&self) -> String {
        format!("{}:retry", self.queue)
    }

    /// Returns the dead letter list.
    pub fn dead(&self) -> String {
        format!("{}:dead", self.queue)
    }

    /// Returns the marker key that records a completed job which wrote only to Redis.
    pub fn done_marker(&self, job_id: &str) -> String {
        format!("{}:done:{job_id}", self.queue)
    }

    /// Returns the key a `cache:warm` job writes the cache entry `name` to.
    pub fn cache(&self, name: &str) -> String {
        format!("{}:cache:{name}", self.queue)
    }

    /// Returns the key a `verify:probe` job writes its result to.
    pub fn probe(job_id: &str) -> String {
        format!("{PROBE_KEY_PREFIX}{job_id}")
    }

    /// Returns the counter of completed jobs of one type.
    pub fn processed_counter(job_type: &str) -> String {
        format!("{PROCESSED_COUNTER}:{job_type}")
    }

    /// Returns the counter of failed attempts of one job type.
    pub fn failed_counter(job_type: &str) -> String {
        format!("{FAILED_COUNTER}:{job_type}")
    }

    /// Returns the counter of jobs completed during the Unix minute `unix_minute`.
    pub fn processed_in_minute(unix_minute: i64) -> String {
        format!("{PROCESSED_PER_MINUTE_PREFIX}{unix_minute}")
    }

    /// Returns the counter of failed attempts during the Unix minute `unix_minute`.
    pub fn failed_in_minute(unix_minute: i64) -> String {
        format!("{FAILED_PER_MINUTE_PREFIX}{unix_minute}")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> QueueKeys {
        QueueKeys::new("yametee:jobs", "yametee-worker@worker-1")
    }

    #[test]
    fn job_keys_are_named_after_queue() {
        let keys = keys();

        assert_eq!(
            keys.own_inflight(),
            "yametee:jobs:inflight:yametee-worker@worker-1"
        );
        assert_eq!(keys.retry(), "yametee:jobs:retry");
        assert_eq!(keys.dead(), "yametee:jobs:dead");
        assert_eq!(keys.done_marker("j1"), "yametee:jobs:done:j1");
        assert_eq!(
            keys.cache("orders:status_counts"),
            "yametee:jobs:cache:orders:status_counts"
        );
    }

    #[test]
    fn shared_keys_ignore_queue_name() {
        let keys = QueueKeys::new("staging:jobs", "w@h");

        assert_eq!(keys.own_heartbeat(), "yametee:workers:w@h");
        assert_eq!(QueueKeys::probe("p-1"), "yametee:probe:p-1");
        assert_eq!(
            QueueKeys::processed_counter("verify:probe"),
            "yametee:stats:processed:verify:probe"
        );
        assert_eq!(
            QueueKeys::failed_counter("email:send"),
            "yametee:stats:failed:email:send"
        );
        assert_eq!(
            QueueKeys::processed_in_minute(29_000_000),
            "yametee:stats:minute:processed:29000000"
        );
        assert_eq!(
            QueueKeys::failed_in_minute(29_000_000),
            "yametee:stats:minute:failed:29000000"
        );
    }

    #[test]
    fn instance_is_read_back_from_inflight_key() {
        let keys = keys();

        assert_eq!(
            keys.instance_of_inflight("yametee:jobs:inflight:other@host-2"),
            Some("other@host-2".to_string())
        );
        assert_eq!(keys.instance_of_inflight("yametee:jobs:inflight:"), None);
        assert_eq!(keys.instance_of_inflight("other:jobs:inflight:w@h"), None);
    }

    #[test]
    fn inflight_pattern_escapes_glob_characters() {
        let keys = QueueKeys::new("jobs[1]*", "w@h");
        assert_eq!(keys.inflight_pattern(), "jobs\\[1\\]\\*:inflight:*");
    }
}
