//! Acknowledgement of finished jobs in batches, and the job counters.
//!
//! Job tasks do not remove a completed job from the in-flight list themselves. They hand
//! it to one acknowledging task, which removes every job that finished since its last
//! round trip and adds to the counters in one `MULTI` transaction, together with the
//! Redis writes of jobs whose only effect is one (`verify:probe`). A deep queue thus costs
//! one round trip per batch of jobs instead of one per job. A job stays in the in-flight
//! list until that transaction succeeds, so a crash in between runs it again, which the
//! handlers make harmless.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::sleep;
use tracing::{error, warn};

use crate::error_chain;
use crate::keys::{QueueKeys, FAILED_COUNTER, PER_MINUTE_COUNTER_TTL, PROCESSED_COUNTER};
use crate::queue::{CounterIncrement, Queue, Removal};
use crate::redact::scrub_secrets;

/// Most jobs removed in one transaction.
const MAX_ACK_BATCH: usize = 512;
/// Finished jobs that may wait for the acknowledging task. A job task that finds the
/// channel full waits with its slot held, which stops the fetch loop when Redis is slow.
const ACK_CHANNEL_CAPACITY: usize = 2 * MAX_ACK_BATCH;
/// Attempts at one transaction before its jobs are left in flight.
pub const ACK_ATTEMPTS: u32 = 3;
/// Wait between two attempts.
pub const ACK_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Jobs of this instance's in-flight list that this process has taken: fetched and
/// waiting, running, or finished and not yet acknowledged. A multiset of raw documents, because two
/// producers may push byte-identical jobs.
///
/// Anything else in the in-flight list was moved there by a fetch whose reply was lost,
/// and [`Queue::return_unclaimed`] returns it to the queue.
#[derive(Default)]
pub struct Claims {
    jobs: Mutex<HashMap<String, usize>>,
}

impl Claims {
    pub fn claim(&self, raw: &str) {
        let mut jobs = self.jobs.lock().expect("claims lock poisoned");
        *jobs.entry(raw.to_string()).or_default() += 1;
    }

    pub fn release(&self, raw: &str) {
        let mut jobs = self.jobs.lock().expect("claims lock poisoned");
        if let Some(count) = jobs.get_mut(raw) {
            *count -= 1;
            if *count == 0 {
                jobs.remove(raw);
            }
        }
    }

    pub fn snapshot(&self) -> HashMap<String, usize> {
        self.jobs.lock().expect("claims lock poisoned").clone()
    }
}

/// Report of a job task that is done with a job.
pub enum Ack {
    /// The job completed: apply `effect`, remove the job from the in-flight list and count
    /// it as processed.
    Completed {
        raw: String,
        job_id: String,
        job_type: &'static str,
        effect: Option<redis::Cmd>,
    },
    /// An attempt failed and the job already left the in-flight list for the retry set or
    /// the dead letter list: count it as failed. `job_type` is `None` for a job whose
    /// type is missing or unknown, which is counted only in the total.
    Failed { job_type: Option<&'static str> },
}

/// Starts the acknowledging task. It ends once every sender is dropped and it has
/// acknowledged what they sent.
pub fn start(
    queue: Queue,
    claims: Arc<Claims>,
    secrets: Vec<String>,
) -> (mpsc::Sender<Ack>, tokio::task::JoinHandle<()>) {
    let (sender, receiver) = mpsc::channel(ACK_CHANNEL_CAPACITY);
    let task = tokio::spawn(acknowledge(queue, claims, secrets, receiver));
    (sender, task)
}

async fn acknowledge(
    mut queue: Queue,
    claims: Arc<Claims>,
    secrets: Vec<String>,
    mut receiver: mpsc::Receiver<Ack>,
) {
    let mut batch = Vec::with_capacity(MAX_ACK_BATCH);
    while let Some(first) = receiver.recv().await {
        batch.push(first);
        while batch.len() < MAX_ACK_BATCH {
            match receiver.try_recv() {
                Ok(ack) => batch.push(ack),
                Err(_) => break,
            }
        }

        flush(&mut queue, &claims, &secrets, &batch).await;
        batch.clear();
    }
}

/// Removes the completed jobs of `batch` and adds its counts, retrying a failed
/// transaction up to [`ACK_ATTEMPTS`] times.
async fn flush(queue: &mut Queue, claims: &Claims, secrets: &[String], batch: &[Ack]) {
    let mut jobs = Vec::new();
    let mut job_ids = Vec::new();
    for ack in batch {
        if let Ack::Completed {
            raw,
            job_id,
            effect,
            ..
        } = ack
        {
            jobs.push((raw.as_str(), effect.as_ref()));
            job_ids.push(job_id.as_str());
        }
    }
    let unix_minute = crate::unix_millis().div_euclid(60_000);
    let increments = counter_increments(batch, unix_minute);

    for attempt in 1..=ACK_ATTEMPTS {
        match queue.complete_batch(&jobs, &increments).await {
            Ok(removals) => {
                for (job_id, removal) in job_ids.iter().zip(removals) {
                    if removal == Removal::NotInFlight {
                        warn!(
                            job_id = %job_id,
                            "Job {job_id} was no longer in this worker's in-flight list at its \
                             completion, because another worker returned it to the queue after \
                             this one missed its heartbeats"
                        );
                    }
                }
                break;
            }
            Err(error) if attempt < ACK_ATTEMPTS => {
                warn!(
                    "Redis failed while acknowledging {} job(s) (attempt {attempt} of {ACK_ATTEMPTS}): {}",
                    jobs.len(),
                    scrub_secrets(&error_chain(&error), secrets)
                );
                sleep(ACK_RETRY_DELAY).await;
            }
            Err(error) => {
                error!(
                    "Gave up acknowledging {} job(s) after {ACK_ATTEMPTS} attempts: they stay in \
                     flight, return to the queue and are skipped as already processed: {}",
                    jobs.len(),
                    scrub_secrets(&error_chain(&error), secrets)
                );
            }
        }
    }

    // Released also after a failure, so that the fetch loop's check for unclaimed jobs
    // returns them to the queue instead of leaving them until the next restart.
    for (raw, _) in &jobs {
        claims.release(raw);
    }
}

/// Sums the batch into `INCRBY` amounts for the total and per-type counters, and for the
/// per-minute counters of `unix_minute`, which expire.
fn counter_increments(batch: &[Ack], unix_minute: i64) -> Vec<CounterIncrement> {
    let mut amounts: HashMap<String, i64> = HashMap::new();
    let mut per_minute: HashMap<String, i64> = HashMap::new();
    for ack in batch {
        let (total, per_type, minute) = match ack {
            Ack::Completed { job_type, .. } => (
                PROCESSED_COUNTER,
                Some(QueueKeys::processed_counter(job_type)),
                QueueKeys::processed_in_minute(unix_minute),
            ),
            Ack::Failed { job_type } => (
                FAILED_COUNTER,
                job_type.map(QueueKeys::failed_counter),
                QueueKeys::failed_in_minute(unix_minute),
            ),
        };
        *amounts.entry(total.to_string()).or_default() += 1;
        if let Some(per_type) = per_type {
            *amounts.entry(per_type).or_default() += 1;
        }
        *per_minute.entry(minute).or_default() += 1;
    }

    let lasting = amounts.into_iter().map(|(key, amount)| CounterIncrement {
        key,
        amount,
        lifetime: None,
    });
    let expiring = per_minute
        .into_iter()
        .map(|(key, amount)| CounterIncrement {
            key,
            amount,
            lifetime: Some(PER_MINUTE_COUNTER_TTL),
        });
    let mut increments: Vec<CounterIncrement> = lasting.chain(expiring).collect();
    increments.sort_by(|a, b| a.key.cmp(&b.key));
    increments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completed(job_type: &'static str) -> Ack {
        Ack::Completed {
            raw: format!("{{\"type\":\"{job_type}\"}}"),
            job_id: "j".to_string(),
            job_type,
            effect: None,
        }
    }

    #[test]
    fn counters_sum_totals_and_types() {
        let batch = [
            completed("verify:probe"),
            completed("verify:probe"),
            completed("order:process"),
            Ack::Failed {
                job_type: Some("email:send"),
            },
            Ack::Failed { job_type: None },
        ];

        let increments = counter_increments(&batch, 29_000_000);
        let amounts: Vec<(&str, i64)> = increments
            .iter()
            .map(|increment| (increment.key.as_str(), increment.amount))
            .collect();

        assert_eq!(
            amounts,
            vec![
                ("yametee:stats:failed", 2),
                ("yametee:stats:failed:email:send", 1),
                ("yametee:stats:minute:failed:29000000", 2),
                ("yametee:stats:minute:processed:29000000", 3),
                ("yametee:stats:processed", 3),
                ("yametee:stats:processed:order:process", 1),
                ("yametee:stats:processed:verify:probe", 2),
            ]
        );
    }

    #[test]
    fn only_per_minute_counters_expire() {
        let increments = counter_increments(&[completed("cache:warm")], 7);

        for increment in &increments {
            let expected = increment
                .key
                .starts_with("yametee:stats:minute:")
                .then_some(PER_MINUTE_COUNTER_TTL);
            assert_eq!(increment.lifetime, expected, "{}", increment.key);
        }
        assert_eq!(increments.len(), 3);
    }

    #[test]
    fn claims_count_identical_jobs() {
        let claims = Claims::default();
        claims.claim("a");
        claims.claim("a");
        claims.claim("b");
        claims.release("a");
        claims.release("c");

        let snapshot = claims.snapshot();
        assert_eq!(snapshot.get("a"), Some(&1));
        assert_eq!(snapshot.get("b"), Some(&1));
        assert_eq!(snapshot.len(), 2);
    }
}
