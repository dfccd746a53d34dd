//! Start-up: the connections to PostgreSQL and Redis, the schema migrations, the SMTP
//! relay, and the queue state a previous run of this instance left behind.

use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::time::{sleep, Instant};
use tracing::{info, warn};

use crate::config::Config;
use crate::db;
use crate::error_chain;
use crate::mail::Mailer;
use crate::maintenance::log_reclaimed;
use crate::queue::{self, Queue, ServerProblem};
use crate::redact::scrub_secrets;
use crate::worker::{reconnect_delay, WorkerError};

/// Time start-up keeps retrying Redis before it gives up and exits non-zero. It stays
/// below the 30 s start timeout the deploy tool gives the unit by default, so the worker
/// exits with its own message instead of being killed by systemd.
pub const REDIS_STARTUP_DEADLINE: Duration = Duration::from_secs(20);

/// Open connections after start-up checks.
pub struct Connections {
    pub database_config: tokio_postgres::Config,
    pub first_database_client: tokio_postgres::Client,
    /// Redis connection for every command except the fetch.
    pub commands: redis::aio::ConnectionManager,
    /// Redis connection reserved for fetching jobs, which blocks while the queue is empty.
    pub fetching: redis::aio::ConnectionManager,
}

/// Connects to PostgreSQL, applies the migrations and connects to Redis, logging the
/// "Database connection successful" and "Redis connection successful" lines.
///
/// A PostgreSQL failure ends start-up at once. A Redis failure is retried with backoff
/// for up to [`REDIS_STARTUP_DEADLINE`], as Redis may still be starting on its host.
/// Returns `None` when a shutdown was requested during those retries.
pub async fn connect(
    config: &Config,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Connections>, WorkerError> {
    let secrets = config.secrets();
    let scrub = |text: String| scrub_secrets(&text, &secrets);

    let database_config = db::connection_config(&config.database_url)
        .map_err(|error| WorkerError::DatabaseConnection(scrub(error_chain(&error))))?;
    let mut first_database_client = connect_database(&database_config)
        .await
        .map_err(|reason| WorkerError::DatabaseConnection(scrub(reason)))?;
    info!("Database connection successful");

    db::apply_migrations(&mut first_database_client)
        .await
        .map_err(|error| WorkerError::DatabaseMigration(scrub(error_chain(&error))))?;

    let Some((commands, fetching)) = connect_redis_with_retries(config, shutdown).await? else {
        return Ok(None);
    };
    info!("Redis connection successful");

    Ok(Some(Connections {
        database_config,
        first_database_client,
        commands,
        fetching,
    }))
}

/// Opens the first PostgreSQL connection and checks it with `SELECT 1`.
async fn connect_database(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, String> {
    let client = db::connect(config)
        .await
        .map_err(|error| error_chain(&error))?;
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|error| error_chain(&error))?;
    Ok(client)
}

async fn connect_redis_with_retries(
    config: &Config,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<(redis::aio::ConnectionManager, redis::aio::ConnectionManager)>, WorkerError> {
    let secrets = config.secrets();
    let started = Instant::now();
    let mut attempt = 0;

    loop {
        attempt += 1;
        let reason = match connect_redis(&config.redis_url).await {
            Ok(connections) => return Ok(Some(connections)),
            Err(ServerProblem::TooOld(reason)) => {
                return Err(WorkerError::RedisConnection(reason));
            }
            Err(ServerProblem::Unreachable(error)) => scrub_secrets(&error_chain(&error), &secrets),
        };

        let delay = reconnect_delay(attempt);
        if started.elapsed() + delay > REDIS_STARTUP_DEADLINE {
            return Err(WorkerError::RedisConnection(format!(
                "{reason} (gave up after {attempt} attempts in {} s)",
                started.elapsed().as_secs()
            )));
        }
        warn!(
            "Redis connection failed (attempt {attempt}), retrying in {} s: {reason}",
            delay.as_secs()
        );
        tokio::select! {
            _ = shutdown.changed() => return Ok(None),
            () = sleep(delay) => {}
        }
    }
}

/// Opens the two Redis connections and checks the server once.
async fn connect_redis(
    url: &str,
) -> Result<(redis::aio::ConnectionManager, redis::aio::ConnectionManager), ServerProblem> {
    let mut commands = queue::connect(url, queue::COMMAND_RESPONSE_TIMEOUT)
        .await
        .map_err(ServerProblem::Unreachable)?;
    queue::check_server(&mut commands).await?;
    let fetching = queue::connect(url, queue::FETCH_RESPONSE_TIMEOUT)
        .await
        .map_err(ServerProblem::Unreachable)?;
    Ok((commands, fetching))
}

/// Creates the SMTP client from `SMTP_URL`, or logs that `email:send` jobs will wait in
/// the retry set when it is not set.
pub fn connect_mailer(config: &Config, instance_host: &str) -> Option<Mailer> {
    let Some(relay) = &config.smtp else {
        warn!(
            "SMTP_URL is not set: email:send jobs are kept in the outbox and retried, and go \
             to the dead letter list after their last attempt"
        );
        return None;
    };

    let from = config
        .smtp_from
        .clone()
        .unwrap_or_else(|| format!("{}@{instance_host}", config.worker_name));
    match Mailer::new(relay, &from) {
        Ok(mailer) => {
            info!(
                "Sending e-mail through SMTP relay {} as {from}",
                mailer.relay()
            );
            Some(mailer)
        }
        Err(reason) => {
            warn!(
                "E-mail is disabled because {reason}: set SMTP_FROM; email:send jobs are \
                 retried until then"
            );
            None
        }
    }
}

/// Returns jobs that an earlier run of this instance left in flight, publishes the first
/// heartbeat, and returns jobs of workers whose heartbeat expired.
pub async fn prepare_queue(queue: &mut Queue, heartbeat: &str) -> redis::RedisResult<()> {
    // An instance name is unique per host and worker name, so whatever its in-flight
    // list contains at start was left by a previous process that stopped mid-job.
    let returned = queue.return_own_inflight().await?;
    if returned > 0 {
        warn!(
            instance = %queue.keys().instance(),
            "Moved {returned} job(s) that a previous run of this worker left in flight back to the queue"
        );
    }

    queue.beat(heartbeat).await?;
    log_reclaimed(&queue.reclaim_from_dead_workers().await?);
    Ok(())
}

/// Returns the instance name `<worker name>@<host name>` that keys the in-flight list and
/// the heartbeat.
pub fn instance_name(worker_name: &str, host_name: &str) -> String {
    format!("{worker_name}@{host_name}")
}

/// Returns the kernel's host name, through uname(2) so that no file under /proc needs to be
/// readable (a hardened unit may hide /proc/sys).
pub fn host_name() -> String {
    // SAFETY: uname fills the zero-initialised struct and does not keep the pointer.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    let known = unsafe { libc::uname(&mut name) } == 0;
    let nodename = if known {
        // SAFETY: uname wrote a NUL-terminated string into nodename.
        unsafe { std::ffi::CStr::from_ptr(name.nodename.as_ptr()) }
            .to_string_lossy()
            .trim()
            .to_string()
    } else {
        String::new()
    };
    if !nodename.is_empty() && nodename != "(none)" {
        return nodename;
    }
    // Two workers both named "@localhost" would share one in-flight list, so say so loudly.
    warn!("Host name unknown; using \"localhost\" in the instance name");
    "localhost".to_string()
}

pub fn heartbeat_value(config: &Config) -> String {
    json!({
        "pid": std::process::id(),
        "startedAt": crate::now_rfc3339(),
        "concurrency": config.concurrency,
        "version": env!("CARGO_PKG_VERSION"),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_name_matches_the_kernel() {
        let expected = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("readable here");
        assert_eq!(host_name(), expected.trim());
    }

    #[test]
    fn instance_name_joins_worker_and_host() {
        assert_eq!(
            instance_name("yametee-worker", "worker-1"),
            "yametee-worker@worker-1"
        );
    }

    #[test]
    fn redis_startup_deadline_fits_default_start_timeout() {
        assert!(REDIS_STARTUP_DEADLINE < Duration::from_secs(30));
    }
}
