//! `webhook:process`: applies a webhook event to the orders it names.
//!
//! Two events change an order: `payment.succeeded` moves a `pending` order to `paid`, and
//! `order.cancelled` moves a `pending` or `paid` order to `cancelled`. Both name the order
//! in the payload's `orderId`. Any other event is marked processed with the result
//! `ignored`.

use serde_json::Value;
use tokio_postgres::Transaction;
use tracing::info;

use super::{record_processed, JobError, Outcome};
use crate::job::{Job, Webhook};

/// Applies the event named by the job and marks it processed in `webhook_events`, in one
/// transaction with the job's `processed_jobs` row.
///
/// A stored event that does not exist, or an order event whose order does not exist, is a
/// permanent failure. A stored event that another job already applied completes this job
/// without applying it again.
pub async fn apply_webhook(
    client: &mut tokio_postgres::Client,
    job: &Job,
    webhook: &Webhook,
    instance: &str,
) -> Result<Outcome, JobError> {
    let transaction = client.transaction().await?;
    if !record_processed(&transaction, job, instance).await? {
        transaction.rollback().await?;
        return Ok(Outcome::AlreadyProcessed);
    }

    let Some(event) = load_or_store_event(&transaction, job, webhook).await? else {
        transaction.commit().await?;
        return Ok(Outcome::AlreadyProcessed);
    };

    let result = apply_event(&transaction, job, &event).await?;
    transaction
        .execute(
            "UPDATE webhook_events
             SET processed_at = now(), result = $2, job_id = coalesce(job_id, $3)
             WHERE id = $1",
            &[&event.id, &result, &job.id],
        )
        .await?;
    transaction.commit().await?;

    info!(
        job_id = %job.id,
        event_id = event.id,
        "Webhook event {} ({}) applied for job {}: {result}",
        event.id,
        event.name.as_deref().unwrap_or("no event name"),
        job.id
    );
    Ok(Outcome::Done)
}

/// A webhook event row, locked for this transaction.
struct Event {
    id: i64,
    name: Option<String>,
    payload: Value,
}

/// Locks the stored event, or stores the inline one. Returns `None` when the stored event
/// was applied before.
async fn load_or_store_event(
    transaction: &Transaction<'_>,
    job: &Job,
    webhook: &Webhook,
) -> Result<Option<Event>, JobError> {
    match webhook {
        Webhook::Stored { event_id } => {
            let row = transaction
                .query_opt(
                    "SELECT event, payload, processed_at IS NOT NULL
                     FROM webhook_events WHERE id = $1 FOR UPDATE",
                    &[event_id],
                )
                .await?
                .ok_or_else(|| {
                    JobError::Permanent(format!("webhook event {event_id} does not exist"))
                })?;
            if row.get::<_, bool>(2) {
                info!(job_id = %job.id, "Webhook event {event_id} was applied before; job {} applies nothing", job.id);
                return Ok(None);
            }
            Ok(Some(Event {
                id: *event_id,
                name: row.get(0),
                payload: row.get(1),
            }))
        }
        Webhook::Inline {
            source,
            event,
            payload,
        } => {
            let payload = Value::Object(payload.clone());
            let id: i64 = transaction
                .query_one(
                    "INSERT INTO webhook_events (job_id, source, event, payload)
                     VALUES ($1, $2, $3, $4)
                     RETURNING id",
                    &[&job.id, source, event, &payload],
                )
                .await?
                .get(0);
            Ok(Some(Event {
                id,
                name: event.clone(),
                payload,
            }))
        }
    }
}

/// Changes the order the event names and returns the result text stored with the event.
async fn apply_event(
    transaction: &Transaction<'_>,
    job: &Job,
    event: &Event,
) -> Result<String, JobError> {
    let (from, to): (&[&str], &str) = match event.name.as_deref() {
        Some("payment.succeeded") => (&["pending"], "paid"),
        Some("order.cancelled") => (&["pending", "paid"], "cancelled"),
        _ => return Ok("ignored".to_string()),
    };

    let order_id = match event.payload.get("orderId") {
        Some(Value::String(id)) if !id.trim().is_empty() => id.clone(),
        Some(Value::Number(id)) => id.to_string(),
        _ => {
            return Err(JobError::Permanent(format!(
                "webhook event {} ({}) has no orderId",
                event.id,
                event.name.as_deref().unwrap_or_default()
            )))
        }
    };

    let status: String = transaction
        .query_opt(
            "SELECT status FROM orders WHERE id = $1 FOR UPDATE",
            &[&order_id],
        )
        .await?
        .ok_or_else(|| {
            JobError::Permanent(format!(
                "order {order_id} of webhook event {} does not exist",
                event.id
            ))
        })?
        .get(0);
    if !from.contains(&status.as_str()) {
        return Ok(format!("order {order_id} left {status}"));
    }

    transaction
        .execute(
            "UPDATE orders SET status = $2, updated_at = now() WHERE id = $1",
            &[&order_id, &to],
        )
        .await?;
    transaction
        .execute(
            "INSERT INTO order_events (order_id, job_id, from_status, to_status)
             VALUES ($1, $2, $3, $4)",
            &[&order_id, &job.id, &status, &to],
        )
        .await?;
    Ok(format!("order {order_id} {to}"))
}
