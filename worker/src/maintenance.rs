//! Background upkeep of the queue: the heartbeat, due retries, and the in-flight jobs of
//! workers that died.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{interval, MissedTickBehavior};
use tracing::{info, warn};

use crate::error_chain;
use crate::queue::{self, Queue};

/// Interval between moves of due retries back to the queue.
const RETRY_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Interval between checks for in-flight jobs of dead workers. With the heartbeat's
/// 15 s lifetime, a dead worker's jobs return within about 30 s.
const RECLAIM_INTERVAL: Duration = Duration::from_secs(15);
/// A repeated background failure is logged on its first occurrence and then once every
/// this many occurrences, so that a Redis outage does not flood the journal.
const FAILURE_LOG_EVERY: u32 = 12;

/// Refreshes the heartbeat, moves due retries back to the queue and returns jobs of dead
/// workers, until `stop` changes.
pub async fn maintain(mut queue: Queue, heartbeat: String, mut stop: watch::Receiver<bool>) {
    let mut heartbeat_timer = interval(queue::HEARTBEAT_INTERVAL);
    let mut retry_timer = interval(RETRY_POLL_INTERVAL);
    let mut reclaim_timer = interval(RECLAIM_INTERVAL);
    for timer in [&mut heartbeat_timer, &mut retry_timer, &mut reclaim_timer] {
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    }
    // Start-up already did each of these once, so the immediate first ticks are skipped.
    heartbeat_timer.reset();
    reclaim_timer.reset();

    let mut heartbeat_failures = FailureLog::new("Refreshing the heartbeat");
    let mut retry_failures = FailureLog::new("Moving due retries to the queue");
    let mut reclaim_failures = FailureLog::new("Returning jobs of dead workers");

    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = heartbeat_timer.tick() => {
                heartbeat_failures.record(queue.beat(&heartbeat).await);
            }
            _ = retry_timer.tick() => {
                let promoted = queue.promote_due_retries(crate::unix_millis()).await;
                if let Ok(count) = &promoted {
                    if *count > 0 {
                        info!("Moved {count} due retry job(s) back to the queue");
                    }
                }
                retry_failures.record(promoted);
            }
            _ = reclaim_timer.tick() => {
                let reclaimed = queue.reclaim_from_dead_workers().await;
                if let Ok(reclaimed) = &reclaimed {
                    log_reclaimed(reclaimed);
                }
                reclaim_failures.record(reclaimed);
            }
        }
    }
}

pub fn log_reclaimed(reclaimed: &[(String, i64)]) {
    for (instance, count) in reclaimed {
        warn!(
            dead_instance = %instance,
            "Moved {count} in-flight job(s) of worker {instance} back to the queue because its heartbeat expired"
        );
    }
}

/// Logs a repeating background failure on its first occurrence and every
/// [`FAILURE_LOG_EVERY`]-th after it, and logs the recovery.
struct FailureLog {
    action: &'static str,
    consecutive: u32,
}

impl FailureLog {
    fn new(action: &'static str) -> FailureLog {
        FailureLog {
            action,
            consecutive: 0,
        }
    }

    fn record<T>(&mut self, result: redis::RedisResult<T>) {
        match result {
            Ok(_) if self.consecutive > 0 => {
                info!(
                    "{} works again after {} failure(s)",
                    self.action, self.consecutive
                );
                self.consecutive = 0;
            }
            Ok(_) => {}
            Err(error) => {
                self.consecutive += 1;
                if self.consecutive % FAILURE_LOG_EVERY == 1 {
                    warn!(
                        "{} failed ({} in a row): {}",
                        self.action,
                        self.consecutive,
                        error_chain(&error)
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_log_counts_and_resets() {
        let mut log = FailureLog::new("Testing");
        let failure = || -> redis::RedisResult<()> {
            Err(redis::RedisError::from((redis::ErrorKind::IoError, "down")))
        };

        log.record(failure());
        log.record(failure());
        assert_eq!(log.consecutive, 2);

        log.record(Ok(()));
        assert_eq!(log.consecutive, 0);
    }
}
