//! The worker's run: start-up, the fetch loop and graceful shutdown.
//!
//! The fetch loop moves jobs in batches while the queue is deep and blocks on `BLMOVE`
//! only when it is empty. It keeps at most `WORKER_CONCURRENCY` running jobs plus
//! [`PREFETCH_JOBS`] fetched ones waiting for a free slot, and every one of them stays in
//! this instance's in-flight list until it is acknowledged.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, timeout};
use tracing::{error, info, warn};

use crate::ack::{self, Ack, Claims};
use crate::config::Config;
use crate::db::DatabaseSlot;
use crate::error_chain;
use crate::execute::FetchedJob;
use crate::keys::QueueKeys;
use crate::mail::Mailer;
use crate::maintenance::maintain;
use crate::queue::{Fetcher, Queue};
use crate::redact::scrub_secrets;
use crate::slots::{HeldJobs, JobSlots, SlotJob};
use crate::startup::{self, Connections};

/// Jobs fetched ahead of a free slot. While every slot is busy the next jobs are already
/// here, so a deep queue of short jobs keeps every slot busy. It also bounds the jobs one
/// instance keeps from other workers on the same queue.
pub const PREFETCH_JOBS: usize = 32;
/// Minimum number of jobs fetched ahead at once while every slot is busy.
const MIN_PREFETCH_BATCH: usize = PREFETCH_JOBS / 2;
/// Consecutive failed fetches after which the worker gives up and exits non-zero, so
/// that systemd restarts it. With the waits of [`reconnect_delay`] in between, this is
/// about a minute.
const MAX_FETCH_FAILURES: u32 = 12;
/// Maximum wait between two attempts at reaching Redis.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// Maximum wait for the maintenance task to stop at shutdown.
const MAINTENANCE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum wait at shutdown for the last acknowledgements. Three attempts with a second
/// between them and a 5 s response timeout each fit.
const ACK_STOP_TIMEOUT: Duration = Duration::from_secs(20);

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
pub struct Shared {
    pub queue: Queue,
    pub claims: Arc<Claims>,
    pub acks: mpsc::Sender<Ack>,
    pub mailer: Option<Mailer>,
    /// Passwords to remove from error messages before logging them.
    secrets: Vec<String>,
}

impl Shared {
    pub fn scrub(&self, text: &str) -> String {
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
    let Some(connections) = startup::connect(&config, &mut shutdown).await? else {
        info!("Worker {} stopped before it was ready", config.worker_name);
        return Ok(());
    };
    let Connections {
        database_config,
        first_database_client,
        commands,
        fetching,
    } = connections;

    let host = startup::host_name();
    let instance = startup::instance_name(&config.worker_name, &host);
    let keys = QueueKeys::new(&config.queue, &instance);
    let mut queue = Queue::new(commands, keys.clone());
    let heartbeat = startup::heartbeat_value(&config);
    startup::prepare_queue(&mut queue, &heartbeat)
        .await
        .map_err(|error| {
            WorkerError::RedisConnection(scrub_secrets(&error_chain(&error), &config.secrets()))
        })?;
    let mailer = startup::connect_mailer(&config, &host);
    info!(
        instance = %instance,
        queue = %config.queue,
        concurrency = config.concurrency,
        "Worker {} started", config.worker_name
    );

    let (stop_maintenance, maintenance_stop) = watch::channel(false);
    let maintenance = tokio::spawn(maintain(queue.clone(), heartbeat, maintenance_stop));
    let claims = Arc::new(Claims::default());
    let (acks, acknowledging) = ack::start(queue.clone(), Arc::clone(&claims), config.secrets());

    let shared = Arc::new(Shared {
        queue: queue.clone(),
        claims,
        acks,
        mailer,
        secrets: config.secrets(),
    });
    let mut database_slots = vec![DatabaseSlot::new(
        database_config.clone(),
        Some(first_database_client),
    )];
    database_slots
        .extend((1..config.concurrency).map(|_| DatabaseSlot::new(database_config.clone(), None)));

    if !*shutdown.borrow() {
        info!("Worker {} ready and waiting for jobs", config.worker_name);
        notify_systemd(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("Waiting for jobs"),
        ]);
    }

    let capacity = config.concurrency + PREFETCH_JOBS;
    let held = Arc::new(HeldJobs::default());
    let mut slots = JobSlots::start(
        database_slots,
        capacity,
        Arc::clone(&shared),
        database_config,
        shutdown.clone(),
    );
    let fetched = FetchLoop {
        fetcher: Fetcher::new(fetching, keys),
        shared: &shared,
        slots: &mut slots,
        held: &held,
        concurrency: config.concurrency,
        capacity,
    }
    .run(&mut shutdown)
    .await;

    notify_systemd(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("Draining jobs"),
    ]);
    slots.drain(&held, config.drain_timeout).await;

    // Dropping the last sender lets the acknowledging task finish its batch and end.
    drop(slots);
    drop(shared);
    if timeout(ACK_STOP_TIMEOUT, acknowledging).await.is_err() {
        warn!(
            "Acknowledgements did not finish within {} s; the jobs concerned return to the queue",
            ACK_STOP_TIMEOUT.as_secs()
        );
    }

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
    release_queue(&mut queue, &config.secrets()).await;

    info!("Worker {} stopped", config.worker_name);
    fetched
}

/// Takes jobs from the queue and hands them to the job slots, holding at most
/// `capacity` jobs at once, until shutdown is requested or Redis stays unreachable.
struct FetchLoop<'a> {
    fetcher: Fetcher,
    shared: &'a Arc<Shared>,
    slots: &'a mut JobSlots,
    held: &'a Arc<HeldJobs>,
    concurrency: usize,
    capacity: usize,
}

/// Way the fetch loop gets its next jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FetchMode {
    /// Take what the queue has, up to the room left, without waiting.
    Batch,
    /// As [`FetchMode::Batch`], then block on `BLMOVE` when the queue was empty.
    BatchOrBlock,
}

impl FetchLoop<'_> {
    async fn run(mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), WorkerError> {
        let mut failures = 0;
        let mut check_unclaimed = false;
        let mut queue_was_deep = false;

        loop {
            if *shutdown.borrow() {
                return Ok(());
            }

            let held = self.held.count();
            let room = self.capacity.saturating_sub(held);
            let Some(mode) = choose_fetch(room, held < self.concurrency, queue_was_deep) else {
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    () = self.held.released() => {}
                    () = self.slots.replace_failed_slot() => {}
                }
                continue;
            };

            if check_unclaimed {
                check_unclaimed = !self.return_unclaimed().await;
            }

            // The fetch is not raced against the shutdown signal: see FETCH_BLOCK_TIMEOUT.
            match self.fetch(mode, room).await {
                Ok(count) => {
                    log_fetch_recovery(&mut failures);
                    queue_was_deep = count >= room;
                }
                Err(error) => {
                    failures += 1;
                    check_unclaimed = true;
                    queue_was_deep = false;
                    let reason = self.shared.scrub(&error_chain(&error));
                    if failures >= MAX_FETCH_FAILURES {
                        return Err(WorkerError::RedisLost(reason));
                    }
                    let delay = reconnect_delay(failures);
                    warn!(
                        "Redis connection failed while fetching jobs (attempt {failures} of \
                         {MAX_FETCH_FAILURES}), reconnecting in {} s: {reason}",
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

    /// Fetches up to `room` jobs, hands them to the slots and returns how many came.
    async fn fetch(&mut self, mode: FetchMode, room: usize) -> redis::RedisResult<usize> {
        let mut raws = self.fetcher.fetch_batch(room).await?;
        if raws.is_empty() && mode == FetchMode::BatchOrBlock {
            raws.extend(self.fetcher.fetch_blocking().await?);
        }

        let picked_up_unix_us = crate::unix_micros();
        let count = raws.len();
        for raw in raws {
            self.shared.claims.claim(&raw);
            let held = self.held.hold();
            let job = FetchedJob {
                raw,
                picked_up_unix_us,
            };
            self.slots.submit(SlotJob { job, held }).await;
        }
        Ok(count)
    }

    /// Returns jobs that a lost fetch reply left in the in-flight list unclaimed. Returns
    /// whether the check ran.
    async fn return_unclaimed(&self) -> bool {
        let mut queue = self.shared.queue.clone();
        match queue.return_unclaimed(&self.shared.claims.snapshot()).await {
            Ok(returned) => {
                if returned > 0 {
                    warn!("Moved {returned} job(s) whose fetch reply was lost back to the queue");
                }
                true
            }
            Err(error) => {
                warn!(
                    "Checking the in-flight list for unclaimed jobs failed: {}",
                    self.shared.scrub(&error_chain(&error))
                );
                false
            }
        }
    }
}

/// Decides whether to fetch now and how, or to wait for a held job to finish (`None`).
///
/// With an idle slot the loop fetches, and blocks when the queue is empty. With every
/// slot busy it fetches ahead only while the last fetch found the queue deep, and only
/// once at least [`MIN_PREFETCH_BATCH`] jobs fit, so that a deep queue is moved in
/// batches rather than one job per finished one.
fn choose_fetch(room: usize, slot_idle: bool, queue_was_deep: bool) -> Option<FetchMode> {
    if room == 0 {
        return None;
    }
    if slot_idle {
        return Some(FetchMode::BatchOrBlock);
    }
    (queue_was_deep && room >= MIN_PREFETCH_BATCH).then_some(FetchMode::Batch)
}

/// Returns the wait after the `failures`-th consecutive failure to reach Redis: 1 s, 2 s,
/// 4 s, then [`MAX_RECONNECT_DELAY`], so a short Redis restart delays jobs by about a
/// second.
pub fn reconnect_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(8);
    Duration::from_secs(1 << doublings).min(MAX_RECONNECT_DELAY)
}

fn log_fetch_recovery(failures: &mut u32) {
    if *failures > 0 {
        info!("Redis connection re-established after {failures} failed fetch(es)");
        *failures = 0;
    }
}

/// Returns unfinished jobs to the queue and deletes the heartbeat key, so that this
/// instance stops counting as live at once instead of after the key's lifetime.
async fn release_queue(queue: &mut Queue, secrets: &[String]) {
    match queue.return_own_inflight().await {
        Ok(0) => {}
        Ok(returned) => info!("Returned {returned} unfinished job(s) to the queue"),
        Err(error) => error!(
            "Returning unfinished jobs to the queue failed; they return when this worker \
             restarts or another worker finds its heartbeat expired: {}",
            scrub_secrets(&error_chain(&error), secrets)
        ),
    }

    if let Err(error) = queue.clear_heartbeat().await {
        warn!(
            "Deleting the heartbeat key failed: {}",
            scrub_secrets(&error_chain(&error), secrets)
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_doubles_up_to_cap() {
        let delays: Vec<u64> = (1..=5)
            .map(|failures| reconnect_delay(failures).as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 5, 5]);
        assert_eq!(reconnect_delay(u32::MAX), MAX_RECONNECT_DELAY);
    }

    #[test]
    fn idle_slot_fetches_and_blocks() {
        assert_eq!(choose_fetch(10, true, false), Some(FetchMode::BatchOrBlock));
        assert_eq!(choose_fetch(1, true, true), Some(FetchMode::BatchOrBlock));
    }

    #[test]
    fn busy_slots_prefetch_batches_from_deep_queue() {
        assert_eq!(
            choose_fetch(MIN_PREFETCH_BATCH, false, true),
            Some(FetchMode::Batch)
        );
        assert_eq!(choose_fetch(MIN_PREFETCH_BATCH - 1, false, true), None);
        assert_eq!(choose_fetch(PREFETCH_JOBS, false, false), None);
    }

    #[test]
    fn no_room_means_waiting() {
        assert_eq!(choose_fetch(0, true, true), None);
    }
}
