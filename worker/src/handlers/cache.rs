//! `cache:warm`: computes order statistics in PostgreSQL and stores them in Redis.

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde_json::{json, Map, Value};
use tokio_postgres::Client;
use tracing::info;

use super::{JobError, Outcome};
use crate::job::{CacheEntry, Job};
use crate::keys::QueueKeys;

/// Lifetime of a cache entry, five minutes, after which readers fall back to the database.
const CACHE_TTL_SECS: u64 = 300;
/// Lifetime of the marker that records a completed `cache:warm` job, seven days: far
/// longer than any redelivery of the same job takes.
const DONE_MARKER_TTL_SECS: u64 = 7 * 24 * 3600;

/// Stores each entry as `{"generatedAt", "value"}` under `<queue>:cache:<name>`.
///
/// The entries and the completion marker are written in one `MULTI`, so a job either
/// warms every entry and counts as done, or writes nothing.
pub async fn warm_cache(
    client: &Client,
    redis: &mut ConnectionManager,
    keys: &QueueKeys,
    job: &Job,
    entries: &[CacheEntry],
) -> Result<Outcome, JobError> {
    let marker = keys.done_marker(&job.id);
    if redis.exists(&marker).await? {
        return Ok(Outcome::AlreadyProcessed);
    }

    let generated_at = crate::now_rfc3339();
    let mut transaction = redis::pipe();
    transaction.atomic();
    for entry in entries {
        let value = compute_entry(client, *entry).await?;
        let document = json!({ "generatedAt": generated_at, "value": value }).to_string();
        transaction.set_ex(keys.cache(entry.name()), document, CACHE_TTL_SECS);
    }
    transaction.set_ex(&marker, keys.instance(), DONE_MARKER_TTL_SECS);
    transaction.query_async::<()>(redis).await?;

    let names: Vec<&str> = entries.iter().map(|entry| entry.name()).collect();
    info!(job_id = %job.id, "Cache warmed for job {}: {}", job.id, names.join(", "));
    Ok(Outcome::Done)
}

async fn compute_entry(client: &Client, entry: CacheEntry) -> Result<Value, tokio_postgres::Error> {
    match entry {
        CacheEntry::OrderStatusCounts => {
            let rows = client
                .query(
                    "SELECT status, count(*) FROM orders GROUP BY status ORDER BY status",
                    &[],
                )
                .await?;
            let counts: Map<String, Value> = rows
                .iter()
                .map(|row| (row.get::<_, String>(0), json!(row.get::<_, i64>(1))))
                .collect();
            Ok(Value::Object(counts))
        }
        CacheEntry::OrderSummary => {
            let row = client
                .query_one(
                    "SELECT count(*),
                            count(*) FILTER (WHERE status = 'processed'),
                            to_char(max(processed_at) AT TIME ZONE 'UTC',
                                    'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
                     FROM orders",
                    &[],
                )
                .await?;
            Ok(json!({
                "totalOrders": row.get::<_, i64>(0),
                "processedOrders": row.get::<_, i64>(1),
                "lastProcessedAt": row.get::<_, Option<String>>(2),
            }))
        }
    }
}
