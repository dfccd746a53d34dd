//! Job handlers: the work each job type does.
//!
//! Every handler makes a repeated delivery of the same job id harmless. Handlers that
//! write to PostgreSQL insert the job id into `processed_jobs` in the same transaction as
//! their writes. Handlers that write only to Redis check a marker key first.

mod cache;
mod email;
mod order;
mod probe;
mod webhook;

use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio_postgres::Transaction;

use crate::db::DatabaseSlot;
use crate::job::{Job, JobRequest};
use crate::keys::QueueKeys;
use crate::mail::Mailer;

/// Maximum time one job may run before it counts as failed and is retried.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Result of a handler that succeeded.
#[derive(Clone)]
pub enum Outcome {
    /// The job did its work.
    Done,
    /// The job id had completed before, so nothing was applied again.
    AlreadyProcessed,
    /// The job's whole effect is this Redis command. The acknowledgement sends it in one
    /// `MULTI` transaction with the job's removal from the in-flight list, so the effect
    /// is applied exactly when the job leaves the list, and costs no round trip of its own.
    WriteOnAck(redis::Cmd),
}

/// A failed attempt at a job. Invalid jobs never get this far; parsing rejects them.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("database query failed")]
    Database(#[from] tokio_postgres::Error),
    #[error("Redis command failed")]
    Redis(#[from] redis::RedisError),
    #[error("job timed out after {} s", .0.as_secs())]
    TimedOut(Duration),
    /// The SMTP relay is not configured or did not accept the message for now.
    #[error("{0}")]
    Mail(String),
    /// A failure that a retry cannot fix, such as an order that does not exist. The job
    /// goes to the dead letter list at once.
    #[error("{0}")]
    Permanent(String),
}

impl JobError {
    /// Returns whether running the job again may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, JobError::Permanent(_))
    }
}

/// Resources a handler may use besides the job itself.
pub struct JobContext<'a> {
    /// This job's own PostgreSQL connection.
    pub database: &'a mut DatabaseSlot,
    pub redis: ConnectionManager,
    pub keys: &'a QueueKeys,
    /// Relay for `email:send`, or `None` when `SMTP_URL` is not set.
    pub mailer: Option<&'a Mailer>,
    /// When the fetch returned this job, in Unix microseconds.
    pub picked_up_unix_us: i64,
}

/// Runs the handler for the job's type.
pub async fn handle(job: &Job, context: JobContext<'_>) -> Result<Outcome, JobError> {
    let JobContext {
        database,
        mut redis,
        keys,
        mailer,
        picked_up_unix_us,
    } = context;
    let instance = keys.instance();

    match &job.request {
        JobRequest::OrderProcess { order_id } => {
            order::process_order(database.client().await?, job, order_id, instance).await
        }
        JobRequest::EmailSend(email) => {
            email::send_email(database.client().await?, mailer, job, email, instance).await
        }
        JobRequest::WebhookProcess(webhook) => {
            webhook::apply_webhook(database.client().await?, job, webhook, instance).await
        }
        JobRequest::CacheWarm { entries } => {
            cache::warm_cache(database.client().await?, &mut redis, keys, job, entries).await
        }
        JobRequest::VerifyProbe => Ok(Outcome::WriteOnAck(probe::probe_result_write(
            job,
            instance,
            picked_up_unix_us,
        ))),
    }
}

/// Records the job as completed inside `transaction`, and returns `false` when the job
/// id had already completed. A concurrent delivery of the same id waits here until the
/// first one commits or rolls back.
async fn record_processed(
    transaction: &Transaction<'_>,
    job: &Job,
    instance: &str,
) -> Result<bool, tokio_postgres::Error> {
    let inserted = transaction
        .execute(
            "INSERT INTO processed_jobs (job_id, job_type, worker) VALUES ($1, $2, $3)
             ON CONFLICT (job_id) DO NOTHING",
            &[&job.id, &job.request.job_type(), &instance],
        )
        .await?;
    Ok(inserted == 1)
}
