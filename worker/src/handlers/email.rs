//! `email:send`: puts a message in the outbox.

use tokio_postgres::Client;
use tracing::info;

use super::{record_processed, JobError, Outcome};
use crate::job::{Email, Job};

/// Stores the message in `email_outbox` with status `queued`.
///
/// TODO: nothing delivers the outbox yet. Sending through the configured SMTP relay
/// (and setting `sent` or `failed`) is not implemented, so messages stay `queued`.
pub async fn queue_email(
    client: &mut Client,
    job: &Job,
    email: &Email,
    instance: &str,
) -> Result<Outcome, JobError> {
    let transaction = client.transaction().await?;
    if !record_processed(&transaction, job, instance).await? {
        transaction.rollback().await?;
        return Ok(Outcome::AlreadyProcessed);
    }

    let outbox_id: i64 = transaction
        .query_one(
            "INSERT INTO email_outbox (job_id, recipient, subject, body, status)
             VALUES ($1, $2, $3, $4, 'queued')
             RETURNING id",
            &[&job.id, &email.to, &email.subject, &email.body],
        )
        .await?
        .get(0);

    transaction.commit().await?;

    // The recipient is personal data, so the log names only the outbox row.
    info!(job_id = %job.id, outbox_id, "Email for job {} queued in the outbox as message {outbox_id}", job.id);
    Ok(Outcome::Done)
}
