//! `verify:probe`: proves to the deploy tool that a worker processes jobs.

use redis::aio::ConnectionManager;
use serde_json::json;
use tracing::info;

use super::{JobError, Outcome};
use crate::job::Job;
use crate::keys::QueueKeys;

/// Lifetime of a probe result, one hour.
const PROBE_RESULT_TTL_SECS: u64 = 3600;

/// Writes `{"worker", "processedAt"}` to `yametee:probe:<job id>` and nothing else.
///
/// `SET NX` makes the key its own completion marker: a repeated delivery keeps the
/// first result.
pub async fn write_probe_result(
    redis: &mut ConnectionManager,
    job: &Job,
    instance: &str,
) -> Result<Outcome, JobError> {
    let key = QueueKeys::probe(&job.id);
    let result = json!({
        "worker": instance,
        "processedAt": crate::now_rfc3339(),
    })
    .to_string();

    let written: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(&result)
        .arg("EX")
        .arg(PROBE_RESULT_TTL_SECS)
        .arg("NX")
        .query_async(redis)
        .await?;

    if written.is_none() {
        return Ok(Outcome::AlreadyProcessed);
    }
    info!(job_id = %job.id, key = %key, "Probe job {} result written to {key}", job.id);
    Ok(Outcome::Done)
}
