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
    redis_cli_within(inventory, secrets, label, args, 10)
}

/// Like [`redis_cli`], with redis-cli stopped after `secs` seconds (exit status 124).
pub fn redis_cli_within(
    inventory: &Inventory,
    secrets: &Secrets,
    label: &str,
    args: &[&str],
    secs: u32,
) -> RemoteCommand {
    let script = r#"IFS= read -r REDISCLI_AUTH; export REDISCLI_AUTH
secs=$1 host=$2 port=$3
shift 3
exec timeout "$secs" redis-cli -h "$host" -p "$port" "$@""#;
    let secs = secs.to_string();
    let address = inventory.redis_host().address.to_string();
    let port = inventory.app.redis.port.to_string();
    let mut all: Vec<&str> = vec![&secs, &address, &port];
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

/// Parses a job's `createdAt` into milliseconds since the Unix epoch. Accepts RFC 3339
/// times with an optional fraction and a `Z` or `±HH:MM` offset, as JavaScript's
/// `Date.toISOString` writes them, and a number of milliseconds, as `Date.now()` returns.
pub fn parse_created_at(value: &serde_json::Value) -> Option<i64> {
    match value {
        serde_json::Value::Number(number) => number
            .as_i64()
            .or_else(|| number.as_f64().map(|ms| ms as i64)),
        serde_json::Value::String(text) => parse_rfc3339_millis(text),
        _ => None,
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff…](Z|±HH:MM)` into milliseconds since the Unix epoch.
pub fn parse_rfc3339_millis(text: &str) -> Option<i64> {
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = text.get(range)?;
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let bytes = text.as_bytes();
    let separators_valid = bytes.len() >= 20
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && matches!(bytes[10], b'T' | b't' | b' ')
        && bytes[13] == b':'
        && bytes[16] == b':';
    if !separators_valid {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // A leap second (60) is accepted and counts as the next second.
    if second > 60 {
        return None;
    }

    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let first_three = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = first_three.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let offset = rest.get(1..)?;
            if offset.len() != 5 || offset.as_bytes()[2] != b':' {
                return None;
            }
            let hours: i64 = offset[..2].parse().ok()?;
            let minutes: i64 = offset[3..].parse().ok()?;
            sign * (hours * 60 + minutes)
        }
    };

    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Some(seconds * 1000 + millis)
}

/// Returns the number of days from 1970-01-01 to a civil date, the inverse of the
/// conversion in [`rfc3339`] (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month_from_march = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * month_from_march + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
    fn rfc3339_parses_back_to_same_time() {
        for millis in [0, 951_782_400_000, 1_735_689_600_123, 4_102_444_799_999] {
            let text = rfc3339(Duration::from_millis(millis));
            assert_eq!(parse_rfc3339_millis(&text), Some(millis as i64), "{text}");
        }
    }

    #[test]
    fn rfc3339_parse_applies_offsets_and_fractions() {
        assert_eq!(
            parse_rfc3339_millis("2025-01-01T01:00:00+01:00"),
            Some(1_735_689_600_000)
        );
        assert_eq!(
            parse_rfc3339_millis("2024-12-31T23:30:00.5-00:30"),
            Some(1_735_689_600_500)
        );
        assert_eq!(
            parse_rfc3339_millis("2025-01-01T00:00:00.123456Z"),
            Some(1_735_689_600_123)
        );
    }

    #[test]
    fn rfc3339_parse_rejects_malformed_times() {
        for text in [
            "",
            "2025-01-01",
            "2025-01-01T00:00:00",
            "2025-13-01T00:00:00Z",
            "2025-01-01T00:00:00.Z",
            "2025-01-01T00:00:00+0100",
            "yesterday at noon, roughly",
        ] {
            assert_eq!(parse_rfc3339_millis(text), None, "{text:?}");
        }
    }

    #[test]
    fn created_at_accepts_milliseconds() {
        assert_eq!(
            parse_created_at(&serde_json::json!(1_735_689_600_123_i64)),
            Some(1_735_689_600_123)
        );
        assert_eq!(
            parse_created_at(&serde_json::json!("2025-01-01T00:00:00.123Z")),
            Some(1_735_689_600_123)
        );
        assert_eq!(parse_created_at(&serde_json::json!(null)), None);
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
