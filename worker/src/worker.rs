//! Start-up, the fetch loop, background maintenance and graceful shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tokio::time::{interval, sleep, timeout, Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::db::{self, DatabaseSlot};
use crate::error_chain;
use crate::handlers::{self, JobContext, JobError, Outcome, JOB_TIMEOUT};
use crate::job::{self, Job};
use crate::keys::QueueKeys;
use crate::queue::{self, Fetcher, Queue, Removal};
use crate::redact::scrub_secrets;
use crate::retry::{self, FailureAction, MAX_ATTEMPTS};

/// Consecutive failed fetches after which the worker gives up and exits non-zero, so
/// that systemd restarts it. With the waits of [`fetch_retry_delay`] in between, this is
/// about a minute.
const MAX_FETCH_FAILURES: u32 = 12;
/// Maximum wait between two failed fetches.
const MAX_FETCH_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Interval between moves of due retries back to the queue.
const RETRY_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Interval between checks for in-flight jobs of dead workers. With the heartbeat's
/// 15 s lifetime, a dead worker's jobs return within about 30 s.
const RECLAIM_INTERVAL: Duration = Duration::from_secs(15);
/// Attempts at removing a finished job from the in-flight list before giving up.
const FINISH_ATTEMPTS: u32 = 3;
/// Maximum wait for the maintenance task to stop at shutdown.
const MAINTENANCE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// A repeated background failure is logged on its first occurrence and then once every
/// this many occurrences, so that a Redis outage does not flood the journal.
const FAILURE_LOG_EVERY: u32 = 12;

/// Failures that stop the worker. The messages of the first three are the log lines the
/// deploy tool's verification looks for.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("Database connection failed: {0}")]
    DatabaseConnection(String),
    #[error("Database migration failed: {0}")]
    DatabaseMigration(String),
    #[error("Redis connection failed: {0}")]
    RedisConnection(String),
    #[error("Redis connection lost: gave up after {MAX_FETCH_FAILURES} failed fetches: {0}")]
    RedisLost(String),
    #[error("Installing the signal handlers failed: {0}")]
    Signals(String),
}

/// State shared by the fetch loop and the job tasks.
struct Shared {
    queue: Queue,
    /// Jobs being processed, as a multiset of their raw documents, so that the fetch
    /// loop can tell them from jobs a lost `BLMOVE` reply left in the in-flight list.
    running: Mutex<HashMap<String, usize>>,
    /// Passwords to remove from error messages before logging them.
    secrets: Vec<String>,
}

impl Shared {
    fn start_running(&self, raw: &str) {
        let mut running = self.running.lock().expect("running jobs lock poisoned");
        *running.entry(raw.to_string()).or_default() += 1;
    }

    fn stop_running(&self, raw: &str) {
        let mut running = self.running.lock().expect("running jobs lock poisoned");
        if let Some(count) = running.get_mut(raw) {
            *count -= 1;
            if *count == 0 {
                running.remove(raw);
            }
        }
    }

    fn running_snapshot(&self) -> HashMap<String, usize> {
        self.running
            .lock()
            .expect("running jobs lock poisoned")
            .clone()
    }

    fn scrub(&self, text: &str) -> String {
        scrub_secrets(text, &self.secrets)
    }
}

/// Connects, applies migrations, and processes jobs until SIGTERM or SIGINT.
///
/// Returns `Ok` after a graceful shutdown, and an error when start-up fails or Redis
/// stays unreachable.
pub async fn run(config: Config) -> Result<(), WorkerError> {
    let mut shutdown =
        listen_for_signals().map_err(|error| WorkerError::Signals(error.to_string()))?;
    let connections = connect(&config).await?;

    let instance = instance_name(&config.worker_name, &host_name());
    let keys = QueueKeys::new(&config.queue, &instance);
    let mut queue = Queue::new(connections.commands, keys.clone());
    let heartbeat = heartbeat_value(&config);
    prepare_queue(&mut queue, &heartbeat)
        .await
        .map_err(|error| {
            WorkerError::RedisConnection(scrub_secrets(&error_chain(&error), &config.secrets()))
        })?;
    info!(
        instance = %instance,
        queue = %config.queue,
        concurrency = config.concurrency,
        "Worker {} started", config.worker_name
    );

    let (stop_maintenance, maintenance_stop) = watch::channel(false);
    let maintenance = tokio::spawn(maintain(queue.clone(), heartbeat, maintenance_stop));

    let shared = Arc::new(Shared {
        queue: queue.clone(),
        running: Mutex::new(HashMap::new()),
        secrets: config.secrets(),
    });
    let database_config = connections.database_config;
    let mut slots = vec![DatabaseSlot::new(
        database_config.clone(),
        Some(connections.first_database_client),
    )];
    slots.extend((1..config.concurrency).map(|_| DatabaseSlot::new(database_config.clone(), None)));

    if !*shutdown.borrow() {
        info!("Worker {} ready and waiting for jobs", config.worker_name);
        notify_systemd(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("Waiting for jobs"),
        ]);
    }

    let mut tasks = JoinSet::new();
    let fetched = fetch_jobs(
        Fetcher::new(connections.blocking, keys),
        &shared,
        slots,
        &database_config,
        &mut tasks,
        &mut shutdown,
    )
    .await;

    notify_systemd(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("Draining jobs"),
    ]);
    drain(&mut tasks, config.drain_timeout).await;

    let _ = stop_maintenance.send(true);
    if timeout(MAINTENANCE_STOP_TIMEOUT, maintenance)
        .await
        .is_err()
    {
        warn!(
            "Maintenance task did not stop within {} s",
            MAINTENANCE_STOP_TIMEOUT.as_secs()
        );
    }
    release_queue(&mut queue, &shared).await;

    info!("Worker {} stopped", config.worker_name);
    fetched
}

/// Open connections after start-up checks.
struct Connections {
    database_config: tokio_postgres::Config,
    first_database_client: tokio_postgres::Client,
    /// Redis connection for every command except the blocking fetch.
    commands: redis::aio::ConnectionManager,
    /// Redis connection reserved for `BLMOVE`.
    blocking: redis::aio::ConnectionManager,
}

/// Connects to PostgreSQL, applies the migrations and connects to Redis, logging the
/// "Database connection successful" and "Redis connection successful" lines.
async fn connect(config: &Config) -> Result<Connections, WorkerError> {
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

    let redis_failed =
        |error: redis::RedisError| WorkerError::RedisConnection(scrub(error_chain(&error)));
    let mut commands = queue::connect(&config.redis_url, queue::COMMAND_RESPONSE_TIMEOUT)
        .await
        .map_err(redis_failed)?;
    queue::check_server(&mut commands)
        .await
        .map_err(|reason| WorkerError::RedisConnection(scrub(reason)))?;
    let blocking = queue::connect(&config.redis_url, queue::FETCH_RESPONSE_TIMEOUT)
        .await
        .map_err(redis_failed)?;
    info!("Redis connection successful");

    Ok(Connections {
        database_config,
        first_database_client,
        commands,
        blocking,
    })
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

/// Returns jobs that an earlier run of this instance left in flight, publishes the first
/// heartbeat, and returns jobs of workers whose heartbeat expired.
async fn prepare_queue(queue: &mut Queue, heartbeat: &str) -> redis::RedisResult<()> {
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

/// Takes jobs from the queue and starts one task per job, with at most one task per
/// database slot, until shutdown is requested or Redis stays unreachable.
async fn fetch_jobs(
    mut fetcher: Fetcher,
    shared: &Arc<Shared>,
    mut idle_slots: Vec<DatabaseSlot>,
    database_config: &tokio_postgres::Config,
    tasks: &mut JoinSet<DatabaseSlot>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let mut failures = 0;
    let mut check_unclaimed = false;

    loop {
        while let Some(finished) = tasks.try_join_next() {
            idle_slots.push(recover_slot(finished, database_config));
        }
        if *shutdown.borrow() {
            return Ok(());
        }

        if idle_slots.is_empty() {
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                Some(finished) = tasks.join_next() => {
                    idle_slots.push(recover_slot(finished, database_config));
                }
            }
            continue;
        }

        if check_unclaimed {
            let mut queue = shared.queue.clone();
            match queue.return_unclaimed(&shared.running_snapshot()).await {
                Ok(returned) => {
                    check_unclaimed = false;
                    if returned > 0 {
                        warn!(
                            "Moved {returned} job(s) whose fetch reply was lost back to the queue"
                        );
                    }
                }
                Err(error) => debug!(
                    "Checking the in-flight list failed: {}",
                    shared.scrub(&error_chain(&error))
                ),
            }
        }

        // The fetch is not raced against the shutdown signal: see FETCH_BLOCK_TIMEOUT.
        match fetcher.fetch().await {
            Ok(Some(raw)) => {
                log_fetch_recovery(&mut failures);
                shared.start_running(&raw);
                let slot = idle_slots.pop().expect("an idle slot was checked above");
                tasks.spawn(run_job(raw, slot, Arc::clone(shared)));
            }
            Ok(None) => log_fetch_recovery(&mut failures),
            Err(error) => {
                failures += 1;
                check_unclaimed = true;
                let reason = shared.scrub(&error_chain(&error));
                if failures >= MAX_FETCH_FAILURES {
                    return Err(WorkerError::RedisLost(reason));
                }
                let delay = fetch_retry_delay(failures);
                warn!(
                    "Fetching a job from Redis failed (attempt {failures} of {MAX_FETCH_FAILURES}), \
                     retrying in {} s: {reason}",
                    delay.as_secs()
                );
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    () = sleep(delay) => {}
                }
            }
        }
    }
}

/// Returns the wait after the `failures`-th consecutive failed fetch: 1 s, 2 s, 4 s, then
/// [`MAX_FETCH_RETRY_DELAY`], so a short Redis restart delays jobs by about a second.
fn fetch_retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(8);
    Duration::from_secs(1 << doublings).min(MAX_FETCH_RETRY_DELAY)
}

fn log_fetch_recovery(failures: &mut u32) {
    if *failures > 0 {
        info!("Fetching jobs from Redis works again after {failures} failure(s)");
        *failures = 0;
    }
}

/// Returns the slot of a finished job task, or a fresh one when the task panicked or was
/// aborted and took its slot with it.
fn recover_slot(
    finished: Result<DatabaseSlot, JoinError>,
    database_config: &tokio_postgres::Config,
) -> DatabaseSlot {
    finished.unwrap_or_else(|error| {
        if error.is_panic() {
            error!(
                "A job task panicked; its job stays in flight until the next restart returns it"
            );
        }
        DatabaseSlot::new(database_config.clone(), None)
    })
}

/// Processes one fetched job and takes it out of the in-flight list: completed, retried
/// later or dead-lettered. Returns the database slot for the next job.
async fn run_job(raw: String, mut slot: DatabaseSlot, shared: Arc<Shared>) -> DatabaseSlot {
    let started = Instant::now();

    match job::parse_job(&raw) {
        Err(rejection) => {
            error!(
                job_id = rejection.job_id.as_deref().map(tracing::field::display),
                job_type = rejection.job_type.as_deref().map(tracing::field::display),
                "Job {} rejected and moved to the dead letter list: {}",
                rejection.job_id.as_deref().unwrap_or("without id"),
                rejection.reason
            );
            let job_id = rejection.job_id.as_deref().unwrap_or("without id");
            dead_letter(&shared, &raw, job_id, &rejection.reason).await;
        }
        Ok(job) => {
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
            };
            let result = timeout(JOB_TIMEOUT, handlers::handle(&job, context))
                .await
                .unwrap_or(Err(JobError::TimedOut(JOB_TIMEOUT)));
            if matches!(result, Err(JobError::TimedOut(_))) {
                slot.discard().await;
            }
            finish_job(&shared, &raw, &job, result, started).await;
        }
    }

    shared.stop_running(&raw);
    slot
}

async fn finish_job(
    shared: &Shared,
    raw: &str,
    job: &Job,
    result: Result<Outcome, JobError>,
    started: Instant,
) {
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);

    let error = match result {
        Ok(outcome) => {
            match outcome {
                Outcome::Done => {
                    info!(job_id = %job.id, elapsed_ms, "Job {} completed in {elapsed_ms} ms", job.id)
                }
                Outcome::AlreadyProcessed => info!(
                    job_id = %job.id,
                    "Job {} was already processed; nothing applied again", job.id
                ),
            }
            remove_from_inflight(shared, &job.id, "completion", |mut queue| {
                let raw = raw.to_string();
                async move { queue.complete(&raw).await }
            })
            .await;
            return;
        }
        Err(error) => shared.scrub(&error_chain(&error)),
    };

    match retry::on_failure(job.attempts) {
        FailureAction::Retry { attempts, delay } => {
            warn!(
                job_id = %job.id,
                job_type = %job.request.job_type(),
                attempt = attempts,
                "Job {} failed (attempt {attempts} of {MAX_ATTEMPTS}), retrying in {} s: {error}",
                job.id,
                delay.as_secs()
            );
            let document = retry::retry_document(&job.document, attempts, &error);
            let due =
                crate::unix_millis() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
            remove_from_inflight(shared, &job.id, "retry scheduling", |mut queue| {
                let (raw, document) = (raw.to_string(), document.clone());
                async move { queue.schedule_retry(&raw, &document, due).await }
            })
            .await;
        }
        FailureAction::DeadLetter { attempts } => {
            let reason = format!("failed {attempts} attempts, last error: {error}");
            error!(
                job_id = %job.id,
                job_type = %job.request.job_type(),
                "Job {} moved to the dead letter list: {reason}", job.id
            );
            dead_letter(shared, raw, &job.id, &reason).await;
        }
    }
}

async fn dead_letter(shared: &Shared, raw: &str, job_id: &str, reason: &str) {
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
}

/// Runs one of the queue operations that take a job out of the in-flight list, up to
/// [`FINISH_ATTEMPTS`] times.
///
/// When every attempt fails, the job stays in the in-flight list and runs again after
/// the next restart of this worker, which is harmless because handlers skip completed
/// job ids.
async fn remove_from_inflight<F, Fut>(shared: &Shared, job_id: &str, action: &str, operation: F)
where
    F: Fn(Queue) -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<Removal>>,
{
    for attempt in 1..=FINISH_ATTEMPTS {
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
            Err(error) if attempt < FINISH_ATTEMPTS => {
                warn!(
                    job_id = %job_id,
                    "Redis failed during the {action} of job {job_id} (attempt {attempt} of {FINISH_ATTEMPTS}): {}",
                    shared.scrub(&error_chain(&error))
                );
                sleep(Duration::from_secs(1)).await;
            }
            Err(error) => {
                error!(
                    job_id = %job_id,
                    "Gave up the {action} of job {job_id} after {FINISH_ATTEMPTS} attempts. It stays in \
                     flight until this worker restarts: {}",
                    shared.scrub(&error_chain(&error))
                );
            }
        }
    }
}

/// Waits up to `drain_timeout` for running jobs, then stops the rest. Their jobs stay in
/// the in-flight list, which [`release_queue`] returns to the queue.
async fn drain(tasks: &mut JoinSet<DatabaseSlot>, drain_timeout: Duration) {
    if tasks.is_empty() {
        return;
    }

    info!(
        "Waiting up to {} s for {} running job(s) to finish",
        drain_timeout.as_secs(),
        tasks.len()
    );
    let finished = timeout(drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_ok() {
        info!("All running jobs finished");
        return;
    }

    warn!(
        "{} job(s) did not finish within the drain timeout of {} s; stopping them",
        tasks.len(),
        drain_timeout.as_secs()
    );
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Returns unfinished jobs to the queue and deletes the heartbeat key, so that this
/// instance stops counting as live at once instead of after the key's lifetime.
async fn release_queue(queue: &mut Queue, shared: &Shared) {
    match queue.return_own_inflight().await {
        Ok(0) => {}
        Ok(returned) => info!("Returned {returned} unfinished job(s) to the queue"),
        Err(error) => error!(
            "Returning unfinished jobs to the queue failed; they return when this worker \
             restarts or another worker finds its heartbeat expired: {}",
            shared.scrub(&error_chain(&error))
        ),
    }

    if let Err(error) = queue.clear_heartbeat().await {
        warn!(
            "Deleting the heartbeat key failed: {}",
            shared.scrub(&error_chain(&error))
        );
    }
}

/// Refreshes the heartbeat, moves due retries back to the queue and returns jobs of dead
/// workers, until `stop` changes.
async fn maintain(mut queue: Queue, heartbeat: String, mut stop: watch::Receiver<bool>) {
    let mut heartbeat_timer = interval(queue::HEARTBEAT_INTERVAL);
    let mut retry_timer = interval(RETRY_POLL_INTERVAL);
    let mut reclaim_timer = interval(RECLAIM_INTERVAL);
    for timer in [&mut heartbeat_timer, &mut retry_timer, &mut reclaim_timer] {
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    }
    // Start-up already did each of these once, so the immediate first ticks are skipped.
    heartbeat_timer.reset();
    reclaim_timer.reset();

    let mut heartbeat_failures = FailureLog::new("Refreshing the heartbeat");
    let mut retry_failures = FailureLog::new("Moving due retries to the queue");
    let mut reclaim_failures = FailureLog::new("Returning jobs of dead workers");

    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = heartbeat_timer.tick() => {
                heartbeat_failures.record(queue.beat(&heartbeat).await);
            }
            _ = retry_timer.tick() => {
                let promoted = queue.promote_due_retries(crate::unix_millis()).await;
                if let Ok(count) = &promoted {
                    if *count > 0 {
                        info!("Moved {count} due retry job(s) back to the queue");
                    }
                }
                retry_failures.record(promoted);
            }
            _ = reclaim_timer.tick() => {
                let reclaimed = queue.reclaim_from_dead_workers().await;
                if let Ok(reclaimed) = &reclaimed {
                    log_reclaimed(reclaimed);
                }
                reclaim_failures.record(reclaimed);
            }
        }
    }
}

fn log_reclaimed(reclaimed: &[(String, i64)]) {
    for (instance, count) in reclaimed {
        warn!(
            dead_instance = %instance,
            "Moved {count} in-flight job(s) of worker {instance} back to the queue because its heartbeat expired"
        );
    }
}

/// Logs a repeating background failure on its first occurrence and every
/// [`FAILURE_LOG_EVERY`]-th after it, and logs the recovery.
struct FailureLog {
    action: &'static str,
    consecutive: u32,
}

impl FailureLog {
    fn new(action: &'static str) -> FailureLog {
        FailureLog {
            action,
            consecutive: 0,
        }
    }

    fn record<T>(&mut self, result: redis::RedisResult<T>) {
        match result {
            Ok(_) if self.consecutive > 0 => {
                info!(
                    "{} works again after {} failure(s)",
                    self.action, self.consecutive
                );
                self.consecutive = 0;
            }
            Ok(_) => {}
            Err(error) => {
                self.consecutive += 1;
                if self.consecutive % FAILURE_LOG_EVERY == 1 {
                    warn!(
                        "{} failed ({} in a row): {}",
                        self.action,
                        self.consecutive,
                        error_chain(&error)
                    );
                }
            }
        }
    }
}

/// Starts listening for SIGTERM and SIGINT. The returned flag turns `true` on the first
/// of them; later signals are ignored so that the drain can finish.
fn listen_for_signals() -> std::io::Result<watch::Receiver<bool>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (requested, shutdown) = watch::channel(false);

    tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        info!("Received {name}: no new jobs are fetched, running jobs get the drain timeout to finish");
        requested.send_replace(true);

        // Keeping the sender alive keeps the flag readable; the handlers stay installed,
        // so further signals do nothing.
        std::future::pending::<()>().await;
    });
    Ok(shutdown)
}

fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd NOTIFY_SOCKET is unset and this does nothing.
    if let Err(error) = sd_notify::notify(false, states) {
        warn!("Notifying systemd failed: {error}");
    }
}

/// Returns the instance name `<worker name>@<host name>` that keys the in-flight list and
/// the heartbeat.
pub fn instance_name(worker_name: &str, host_name: &str) -> String {
    format!("{worker_name}@{host_name}")
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .filter(|name| !name.is_empty())
        })
        .unwrap_or_else(|| {
            warn!("Host name unknown; using \"localhost\" in the instance name");
            "localhost".to_string()
        })
}

fn heartbeat_value(config: &Config) -> String {
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
    fn instance_name_joins_worker_and_host() {
        assert_eq!(
            instance_name("yametee-worker", "worker-1"),
            "yametee-worker@worker-1"
        );
    }

    #[test]
    fn fetch_retry_delay_doubles_up_to_cap() {
        let delays: Vec<u64> = (1..=5)
            .map(|failures| fetch_retry_delay(failures).as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 5, 5]);
        assert_eq!(fetch_retry_delay(u32::MAX), MAX_FETCH_RETRY_DELAY);
    }

    #[test]
    fn failure_log_counts_and_resets() {
        let mut log = FailureLog::new("Testing");
        let failure = || -> redis::RedisResult<()> {
            Err(redis::RedisError::from((redis::ErrorKind::IoError, "down")))
        };

        log.record(failure());
        log.record(failure());
        assert_eq!(log.consecutive, 2);

        log.record(Ok(()));
        assert_eq!(log.consecutive, 0);
    }
}
