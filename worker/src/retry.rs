//! Retry policy for failed jobs, and the documents written to the retry set and the
//! dead letter list.

use std::time::Duration;

use serde_json::{json, Map, Value};

/// Number of times a job runs before it goes to the dead letter list.
pub const MAX_ATTEMPTS: u32 = 5;
/// Wait before the first retry; each later retry waits twice as long as the one before.
pub const BASE_RETRY_DELAY: Duration = Duration::from_secs(10);
/// Maximum wait between two attempts.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(15 * 60);

/// Decision for a job whose attempt just failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureAction {
    /// Run the job again after `delay`; `attempts` is the failed attempt count to store.
    Retry { attempts: u32, delay: Duration },
    /// Give up: the job has used all [`MAX_ATTEMPTS`] attempts.
    DeadLetter { attempts: u32 },
}

/// Decides the fate of a job that had `previous_attempts` failed attempts before the one
/// that just failed. `jitter` is a number from 0 to 1, random in production, that spreads
/// the retries of jobs which failed together (see [`with_jitter`]).
pub fn on_failure(previous_attempts: u32, jitter: f64) -> FailureAction {
    let attempts = previous_attempts.saturating_add(1);
    if attempts >= MAX_ATTEMPTS {
        return FailureAction::DeadLetter { attempts };
    }
    FailureAction::Retry {
        attempts,
        delay: with_jitter(backoff_delay(attempts), jitter),
    }
}

/// Returns a delay from half of `delay` (`jitter` 0) up to the whole of it (`jitter` 1).
///
/// Jobs that failed in the same outage would otherwise all come back in the same second
/// and could cause the next one. Half the delay stays fixed, so the wait still grows.
pub fn with_jitter(delay: Duration, jitter: f64) -> Duration {
    let half = delay / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// Returns the wait after the `failed_attempts`-th failure: 10 s, 20 s, 40 s, … up to
/// [`MAX_RETRY_DELAY`].
pub fn backoff_delay(failed_attempts: u32) -> Duration {
    let doublings = failed_attempts.saturating_sub(1).min(31);
    BASE_RETRY_DELAY
        .checked_mul(1u32 << doublings)
        .map_or(MAX_RETRY_DELAY, |delay| delay.min(MAX_RETRY_DELAY))
}

/// Returns the job document to store in the retry set: the original fields plus the
/// failed attempt count and the last error.
pub fn retry_document(document: &Map<String, Value>, attempts: u32, last_error: &str) -> String {
    let mut document = document.clone();
    document.insert("attempts".to_string(), json!(attempts));
    document.insert("lastError".to_string(), json!(last_error));
    Value::Object(document).to_string()
}

/// Returns the dead letter envelope for a job given as received.
///
/// The job is embedded as JSON when `raw` parses, and as a string otherwise, so a
/// malformed job can still be read back exactly as the producer sent it.
pub fn dead_letter_envelope(raw: &str, reason: &str, failed_at: &str, instance: &str) -> String {
    let job = serde_json::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    json!({
        "job": job,
        "reason": reason,
        "failedAt": failed_at,
        "worker": instance,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_ten_seconds() {
        let delays: Vec<u64> = (1..=5)
            .map(|attempt| backoff_delay(attempt).as_secs())
            .collect();
        assert_eq!(delays, vec![10, 20, 40, 80, 160]);
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff_delay(8), Duration::from_secs(900));
        assert_eq!(backoff_delay(40), MAX_RETRY_DELAY);
        assert_eq!(backoff_delay(u32::MAX), MAX_RETRY_DELAY);
    }

    #[test]
    fn backoff_for_zero_attempts_is_base_delay() {
        assert_eq!(backoff_delay(0), BASE_RETRY_DELAY);
    }

    #[test]
    fn failures_retry_until_attempt_limit() {
        assert_eq!(
            on_failure(0, 1.0),
            FailureAction::Retry {
                attempts: 1,
                delay: Duration::from_secs(10)
            }
        );
        assert_eq!(
            on_failure(3, 1.0),
            FailureAction::Retry {
                attempts: 4,
                delay: Duration::from_secs(80)
            }
        );
        assert_eq!(
            on_failure(4, 0.5),
            FailureAction::DeadLetter { attempts: 5 }
        );
        assert_eq!(
            on_failure(u32::MAX, 0.5),
            FailureAction::DeadLetter { attempts: u32::MAX }
        );
    }

    #[test]
    fn jitter_keeps_delay_between_half_and_whole() {
        let delay = Duration::from_secs(40);

        assert_eq!(with_jitter(delay, 0.0), Duration::from_secs(20));
        assert_eq!(with_jitter(delay, 0.5), Duration::from_secs(30));
        assert_eq!(with_jitter(delay, 1.0), delay);
        assert_eq!(with_jitter(delay, -3.0), Duration::from_secs(20));
        assert_eq!(with_jitter(delay, 7.0), delay);
    }

    #[test]
    fn retry_document_keeps_fields_and_sets_counter() {
        let document: Map<String, Value> = serde_json::from_str(
            r#"{"id":"j1","type":"email:send","data":{"to":"a@b.c"},"createdAt":"2025-01-01T00:00:00.000Z","attempts":1}"#,
        )
        .unwrap();

        let retried: Value =
            serde_json::from_str(&retry_document(&document, 2, "db down")).unwrap();

        assert_eq!(retried["id"], "j1");
        assert_eq!(retried["data"]["to"], "a@b.c");
        assert_eq!(retried["createdAt"], "2025-01-01T00:00:00.000Z");
        assert_eq!(retried["attempts"], 2);
        assert_eq!(retried["lastError"], "db down");
    }

    #[test]
    fn dead_letter_envelope_embeds_valid_job() {
        let envelope: Value = serde_json::from_str(&dead_letter_envelope(
            r#"{"id":"u1","type":"nope"}"#,
            "unknown job type",
            "2025-01-01T00:00:00.000Z",
            "w@h",
        ))
        .unwrap();

        assert_eq!(envelope["job"]["id"], "u1");
        assert_eq!(envelope["reason"], "unknown job type");
        assert_eq!(envelope["failedAt"], "2025-01-01T00:00:00.000Z");
        assert_eq!(envelope["worker"], "w@h");
    }

    #[test]
    fn dead_letter_envelope_keeps_invalid_job_as_text() {
        let envelope: Value =
            serde_json::from_str(&dead_letter_envelope("{broken", "not JSON", "t", "w@h")).unwrap();
        assert_eq!(envelope["job"], "{broken");
    }
}
