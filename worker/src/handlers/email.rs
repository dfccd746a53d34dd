//! `email:send`: records the message in the outbox and delivers it through the SMTP relay.

use tokio_postgres::Client;
use tracing::info;

use super::{record_processed, JobError, Outcome};
use crate::job::{Email, Job};
use crate::mail::{MailError, Mailer, OutgoingEmail};

/// Reason stored for a message that waits because no relay is configured.
pub const NO_RELAY: &str = "no SMTP relay is configured: set SMTP_URL";

/// Sends the message once and records each attempt in its `email_outbox` row.
///
/// The row is locked for the whole attempt, so a second delivery of the same job waits
/// and then finds the status `sent`. A relay that is missing or fails for now leaves the
/// row `queued` and fails the attempt into the retry set. A relay that rejects the message
/// for good marks the row `failed` and the job goes to the dead letter list.
///
/// NOTE: SMTP cannot take part in the PostgreSQL transaction. If the worker dies after
/// the relay accepted the message and before the commit, the next delivery of the job
/// sends it again, with the same `Message-ID`.
pub async fn send_email(
    client: &mut Client,
    mailer: Option<&Mailer>,
    job: &Job,
    email: &Email,
    instance: &str,
) -> Result<Outcome, JobError> {
    let transaction = client.transaction().await?;
    transaction
        .execute(
            "INSERT INTO email_outbox (job_id, recipient, subject, body, status)
             VALUES ($1, $2, $3, $4, 'queued')
             ON CONFLICT (job_id) DO NOTHING",
            &[&job.id, &email.to, &email.subject, &email.body],
        )
        .await?;
    let row = transaction
        .query_one(
            "SELECT id, status FROM email_outbox WHERE job_id = $1 FOR UPDATE",
            &[&job.id],
        )
        .await?;
    let outbox_id: i64 = row.get(0);
    if row.get::<_, &str>(1) == "sent" {
        return Ok(Outcome::AlreadyProcessed);
    }

    let Some(mailer) = mailer else {
        record_attempt(&transaction, outbox_id, "queued", Some(NO_RELAY), None).await?;
        transaction.commit().await?;
        return Err(JobError::Mail(NO_RELAY.to_string()));
    };

    let message_id = format!("yametee-outbox-{outbox_id}@{}", mailer.sender_domain());
    let outgoing = OutgoingEmail {
        to: &email.to,
        subject: &email.subject,
        body: &email.body,
        message_id: &message_id,
    };
    match mailer.send(&outgoing).await {
        Ok(()) => {
            record_attempt(&transaction, outbox_id, "sent", None, Some(&message_id)).await?;
            record_processed(&transaction, job, instance).await?;
            transaction.commit().await?;
        }
        Err(MailError::Transient(reason)) => {
            record_attempt(&transaction, outbox_id, "queued", Some(&reason), None).await?;
            transaction.commit().await?;
            return Err(JobError::Mail(reason));
        }
        Err(MailError::Permanent(reason)) => {
            record_attempt(&transaction, outbox_id, "failed", Some(&reason), None).await?;
            transaction.commit().await?;
            return Err(JobError::Permanent(reason));
        }
    }

    // The recipient is personal data, so the log names only the outbox row.
    info!(
        job_id = %job.id,
        outbox_id,
        "Email for job {} sent through {} as outbox message {outbox_id}",
        job.id,
        mailer.relay()
    );
    Ok(Outcome::Done)
}

async fn record_attempt(
    transaction: &tokio_postgres::Transaction<'_>,
    outbox_id: i64,
    status: &str,
    error: Option<&str>,
    message_id: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    transaction
        .execute(
            "UPDATE email_outbox
             SET status = $2,
                 attempts = attempts + 1,
                 last_error = $3,
                 message_id = coalesce($4, message_id),
                 sent_at = CASE WHEN $2 = 'sent' THEN now() ELSE sent_at END
             WHERE id = $1",
            &[&outbox_id, &status, &error, &message_id],
        )
        .await?;
    Ok(())
}
