//! `order:process`: moves an order to the `processed` status.

use tokio_postgres::Client;
use tracing::info;

use super::{record_processed, JobError, Outcome};
use crate::job::Job;

/// Order statuses that `order:process` moves to [`PROCESSED`].
const PROCESSABLE: [&str; 2] = ["pending", "paid"];
/// Status of an order this worker has processed.
const PROCESSED: &str = "processed";

/// Processes one order and logs "Order <id> processed: <result>", where the result is
/// `processed`, `already_processed`, or `skipped_<status>` for an order in a status that
/// is not processed (a cancelled order, say).
///
/// An unknown order is a permanent failure, so the job goes to the dead letter list
/// without retries: the web platform sends the job after it created the order, so a
/// missing order will not appear later.
pub async fn process_order(
    client: &mut Client,
    job: &Job,
    order_id: &str,
    instance: &str,
) -> Result<Outcome, JobError> {
    let transaction = client.transaction().await?;
    if !record_processed(&transaction, job, instance).await? {
        transaction.rollback().await?;
        return Ok(Outcome::AlreadyProcessed);
    }

    let current = transaction
        .query_opt(
            "SELECT status FROM orders WHERE id = $1 FOR UPDATE",
            &[&order_id],
        )
        .await?
        .map(|row| row.get::<_, String>(0));

    let result = match current.as_deref() {
        // Returning drops the transaction, which rolls back the processed_jobs row.
        None => {
            return Err(JobError::Permanent(format!(
                "order {order_id} does not exist"
            )))
        }
        Some(PROCESSED) => "already_processed".to_string(),
        Some(status) if PROCESSABLE.contains(&status) => {
            transaction
                .execute(
                    "UPDATE orders SET status = $2, processed_at = now(), updated_at = now()
                     WHERE id = $1",
                    &[&order_id, &PROCESSED],
                )
                .await?;
            transaction
                .execute(
                    "INSERT INTO order_events (order_id, job_id, from_status, to_status)
                     VALUES ($1, $2, $3, $4)",
                    &[&order_id, &job.id, &status, &PROCESSED],
                )
                .await?;
            PROCESSED.to_string()
        }
        Some(status) => format!("skipped_{status}"),
    };

    transaction.commit().await?;

    info!(
        job_id = %job.id,
        order_id = %order_id,
        result = %result,
        "Order {order_id} processed: {result}"
    );
    Ok(Outcome::Done)
}
