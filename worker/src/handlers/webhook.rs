//! `webhook:process`: records a webhook delivery.

use serde_json::Value;
use tokio_postgres::Client;
use tracing::info;

use super::{record_processed, JobError, Outcome};
use crate::job::{Job, Webhook};

/// Stores the delivery in `webhook_events` with its processing time.
pub async fn record_webhook(
    client: &mut Client,
    job: &Job,
    webhook: &Webhook,
    instance: &str,
) -> Result<Outcome, JobError> {
    let transaction = client.transaction().await?;
    if !record_processed(&transaction, job, instance).await? {
        transaction.rollback().await?;
        return Ok(Outcome::AlreadyProcessed);
    }

    let payload = Value::Object(webhook.payload.clone());
    let event_id: i64 = transaction
        .query_one(
            "INSERT INTO webhook_events (job_id, source, event, payload, processed_at)
             VALUES ($1, $2, $3, $4, now())
             RETURNING id",
            &[&job.id, &webhook.source, &webhook.event, &payload],
        )
        .await?
        .get(0);

    transaction.commit().await?;

    info!(
        job_id = %job.id,
        event_id,
        "Webhook for job {} recorded as event {event_id}", job.id
    );
    Ok(Outcome::Done)
}
