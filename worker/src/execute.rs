//! One job from fetch to its end: parsing, the handler, and the move out of the in-flight
//! list, to completion, the retry set or the dead letter list.

use std::sync::Arc;

use tokio::time::{sleep, timeout, Instant};
use tracing::{debug, error, info, warn};

use crate::ack::{Ack, ACK_ATTEMPTS, ACK_RETRY_DELAY};
use crate::db::DatabaseSlot;
use crate::error_chain;
use crate::handlers::{self, JobContext, JobError, Outcome, JOB_TIMEOUT};
use crate::job::{self, Job, JOB_TYPES};
use crate::queue::{Queue, Removal};
use crate::retry::{self, FailureAction, MAX_ATTEMPTS};
use crate::worker::Shared;

/// A job as the fetch returned it.
pub struct FetchedJob {
    pub raw: String,
    /// When the fetch returned it, in Unix microseconds.
    pub picked_up_unix_us: i64,
}

/// Processes one fetched job and hands it on: completed jobs to the acknowledging task,
/// failed ones to the retry set or the dead letter list. Returns the database slot for
/// the next job.
pub async fn run_job(
    fetched: FetchedJob,
    mut slot: DatabaseSlot,
    shared: Arc<Shared>,
) -> DatabaseSlot {
    let started = Instant::now();
    let raw = fetched.raw;

    let job = match job::parse_job(&raw) {
        Ok(job) => job,
        Err(rejection) => {
            let job_id = rejection.job_id.as_deref().unwrap_or("without id");
            error!(
                job_id = rejection.job_id.as_deref().map(tracing::field::display),
                job_type = rejection.job_type.as_deref().map(tracing::field::display),
                "Job {job_id} rejected and moved to the dead letter list: {}",
                rejection.reason
            );
            let job_type = rejection.job_type.as_deref().and_then(known_job_type);
            dead_letter(&shared, &raw, job_id, job_type, &rejection.reason).await;
            return slot;
        }
    };

    info!(
        job_id = %job.id,
        job_type = %job.request.job_type(),
        attempt = job.attempts + 1,
        "Processing job {} of type {}", job.id, job.request.job_type()
    );
    let context = JobContext {
        database: &mut slot,
        redis: shared.queue.connection(),
        keys: shared.queue.keys(),
        mailer: shared.mailer.as_ref(),
        picked_up_unix_us: fetched.picked_up_unix_us,
    };
    // Boxed because the handlers' futures are large, and each spawned job task would
    // otherwise copy all of them, though a probe job runs none.
    let result = timeout(JOB_TIMEOUT, Box::pin(handlers::handle(&job, context)))
        .await
        .unwrap_or(Err(JobError::TimedOut(JOB_TIMEOUT)));
    if matches!(result, Err(JobError::TimedOut(_))) {
        slot.discard().await;
    }

    match result {
        Ok(outcome) => complete_job(&shared, raw, job, outcome, started).await,
        Err(error) => fail_job(&shared, &raw, &job, &error).await,
    }
    slot
}

/// Returns the `&'static` name of a known job type.
fn known_job_type(job_type: &str) -> Option<&'static str> {
    JOB_TYPES.into_iter().find(|known| *known == job_type)
}

async fn complete_job(shared: &Shared, raw: String, job: Job, outcome: Outcome, started: Instant) {
    let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let effect = match outcome {
        Outcome::Done => {
            debug!(job_id = %job.id, elapsed_us, "Job {} completed in {elapsed_us} µs", job.id);
            None
        }
        Outcome::WriteOnAck(command) => {
            debug!(job_id = %job.id, elapsed_us, "Job {} completed in {elapsed_us} µs; its write goes with the acknowledgement", job.id);
            Some(command)
        }
        Outcome::AlreadyProcessed => {
            info!(
                job_id = %job.id,
                "Job {} was already processed; nothing applied again", job.id
            );
            None
        }
    };

    let job_id = job.id.clone();
    let ack = Ack::Completed {
        raw,
        job_id: job.id,
        job_type: job.request.job_type(),
        effect,
    };
    // The acknowledging task ends only once every sender is gone, and `shared` contains
    // one, so this fails only when that task panicked.
    if shared.acks.send(ack).await.is_err() {
        error!(
            job_id = %job_id,
            "Job {job_id} completed but cannot be acknowledged; it stays in flight and runs again after a restart"
        );
    }
}

async fn fail_job(shared: &Shared, raw: &str, job: &Job, error: &JobError) {
    let reason = shared.scrub(&error_chain(error));
    let job_type = job.request.job_type();

    let action = if error.is_retryable() {
        retry::on_failure(job.attempts, rand::random::<f64>())
    } else {
        FailureAction::DeadLetter {
            attempts: job.attempts.saturating_add(1),
        }
    };

    match action {
        FailureAction::Retry { attempts, delay } => {
            warn!(
                job_id = %job.id,
                job_type = %job_type,
                attempt = attempts,
                "Job {} failed (attempt {attempts} of {MAX_ATTEMPTS}), retrying in {} s: {reason}",
                job.id,
                delay.as_secs()
            );
            let document = retry::retry_document(&job.document, attempts, &reason);
            let due =
                crate::unix_millis() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
            remove_from_inflight(shared, &job.id, "retry scheduling", |mut queue| {
                let (raw, document) = (raw.to_string(), document.clone());
                async move { queue.schedule_retry(&raw, &document, due).await }
            })
            .await;
            shared.claims.release(raw);
            let _ = shared
                .acks
                .send(Ack::Failed {
                    job_type: Some(job_type),
                })
                .await;
        }
        FailureAction::DeadLetter { attempts } => {
            let reason = if error.is_retryable() {
                format!("failed {attempts} attempts, last error: {reason}")
            } else {
                reason
            };
            error!(
                job_id = %job.id,
                job_type = %job_type,
                "Job {} moved to the dead letter list: {reason}", job.id
            );
            dead_letter(shared, raw, &job.id, Some(job_type), &reason).await;
        }
    }
}

async fn dead_letter(
    shared: &Shared,
    raw: &str,
    job_id: &str,
    job_type: Option<&'static str>,
    reason: &str,
) {
    let envelope = retry::dead_letter_envelope(
        raw,
        reason,
        &crate::now_rfc3339(),
        shared.queue.keys().instance(),
    );
    remove_from_inflight(
        shared,
        job_id,
        "move to the dead letter list",
        |mut queue| {
            let (raw, envelope) = (raw.to_string(), envelope.clone());
            async move { queue.dead_letter(&raw, &envelope).await }
        },
    )
    .await;
    shared.claims.release(raw);
    let _ = shared.acks.send(Ack::Failed { job_type }).await;
}

/// Runs one of the queue operations that take a failed job out of the in-flight list, up
/// to [`ACK_ATTEMPTS`] times.
///
/// When every attempt fails, the job stays in the in-flight list. The fetch loop returns
/// it to the queue after its next failed fetch, or this worker's next start does, and it
/// runs again.
async fn remove_from_inflight<F, Fut>(shared: &Shared, job_id: &str, action: &str, operation: F)
where
    F: Fn(Queue) -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<Removal>>,
{
    for attempt in 1..=ACK_ATTEMPTS {
        match operation(shared.queue.clone()).await {
            Ok(Removal::Removed) => return,
            Ok(Removal::NotInFlight) => {
                warn!(
                    job_id = %job_id,
                    "Job {job_id} was no longer in this worker's in-flight list at its {action}, \
                     because another worker returned it to the queue after this one missed its heartbeats"
                );
                return;
            }
            Err(error) if attempt < ACK_ATTEMPTS => {
                warn!(
                    job_id = %job_id,
                    "Redis failed during the {action} of job {job_id} (attempt {attempt} of {ACK_ATTEMPTS}): {}",
                    shared.scrub(&error_chain(&error))
                );
                sleep(ACK_RETRY_DELAY).await;
            }
            Err(error) => {
                error!(
                    job_id = %job_id,
                    "Gave up the {action} of job {job_id} after {ACK_ATTEMPTS} attempts; it stays \
                     in flight and runs again later: {}",
                    shared.scrub(&error_chain(&error))
                );
            }
        }
    }
}
