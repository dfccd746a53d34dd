//! The job queue as the web platform uses it. Jobs are in its JSON format and are pushed with
//! `RPUSH` onto the Redis list from a host's own network position, through `redis-cli` over SSH.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::inventory::Inventory;
use crate::secrets::Secrets;
use crate::ssh::{Remote, RemoteCommand, SshError};

/// Job types the worker processes.
pub const JOB_TYPES: [&str; 5] = [
    "order:process",
    "email:send",
    "webhook:process",
    "cache:warm",
    "verify:probe",
];

/// Builds a `redis-cli` command against the inventory's Redis, to run on any host. The password
/// travels on standard input, and `timeout` bounds the client to 10 s.
pub fn redis_cli(
    inventory: &Inventory,
    secrets: &Secrets,
    label: &str,
    args: &[&str],
) -> RemoteCommand {
    let script = r#"IFS= read -r REDISCLI_AUTH; export REDISCLI_AUTH
host=$1 port=$2
shift 2
exec timeout 10 redis-cli -h "$host" -p "$port" "$@""#;
    let address = inventory.redis_host().address.to_string();
    let port = inventory.app.redis.port.to_string();
    let mut all: Vec<&str> = vec![&address, &port];
    all.extend_from_slice(args);
    RemoteCommand::script(label, script, &all)
        .stdin(format!("{}\n", secrets.get("app.redis.password")))
}

/// Builds a job in the web platform's format: `{"id","type","data","createdAt"}`.
pub fn job_json(id: &str, job_type: &str, data: serde_json::Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    serde_json::json!({
        "id": id,
        "type": job_type,
        "data": data,
        "createdAt": rfc3339(now),
    })
    .to_string()
}

/// Generates a job id from the prefix, the Unix time and 32 random bits.
pub fn new_job_id(prefix: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{prefix}-{}-{:08x}", now.as_secs(), rand::random::<u32>())
}

/// Pushes `job` onto the queue from `remote` and returns the queue's length after the push.
pub async fn push(
    remote: &Remote,
    inventory: &Inventory,
    secrets: &Secrets,
    job: &str,
) -> Result<u64, SshError> {
    let command = redis_cli(
        inventory,
        secrets,
        "push a job",
        &["RPUSH", &inventory.app.queue, job],
    );
    let reply = remote.run(&command).await?;
    Ok(reply.trim().parse().unwrap_or_default())
}

/// Formats a time since the Unix epoch as RFC 3339 in UTC with milliseconds, as JavaScript's
/// `Date.toISOString` does.
pub fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (hour, minute, second) = (rest / 3600, rest % 3600 / 60, rest % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:03}Z",
        since_epoch.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(Duration::from_secs(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(Duration::from_millis(1_735_689_600_123)),
            "2025-01-01T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn job_has_web_platform_fields() {
        let job: serde_json::Value = serde_json::from_str(&job_json(
            "j1",
            "order:process",
            serde_json::json!({"orderId": "o1"}),
        ))
        .unwrap();
        assert_eq!(job["id"], "j1");
        assert_eq!(job["type"], "order:process");
        assert_eq!(job["data"]["orderId"], "o1");
        assert!(job["createdAt"].as_str().unwrap().ends_with('Z'));
    }
}
