//! Job slots: one long-lived task per unit of `WORKER_CONCURRENCY`, each with its own
//! PostgreSQL connection, taking fetched jobs from a local channel one after another.
//!
//! A slot that finishes a job takes the next one without waking the fetch loop, which
//! only refills the channel. [`HeldJobs`] counts the jobs between fetch and finish, from
//! which the fetch loop computes how many more it may take.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Mutex, Notify};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{error, info, warn};

use crate::db::DatabaseSlot;
use crate::error_chain;
use crate::execute::{run_job, FetchedJob};
use crate::worker::Shared;

/// Number of jobs fetched and not yet finished, waiting in the channel or running.
#[derive(Default)]
pub struct HeldJobs {
    count: AtomicUsize,
    released: Notify,
}

impl HeldJobs {
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Counts one more job until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>) -> HeldJob {
        self.count.fetch_add(1, Ordering::AcqRel);
        HeldJob {
            jobs: Arc::clone(self),
        }
    }

    /// Waits until a job is released. A release since the last wait counts, so none is
    /// missed between a check of [`HeldJobs::count`] and this call.
    pub async fn released(&self) {
        self.released.notified().await;
    }
}

/// One job counted in [`HeldJobs`]. Dropping it, also while a panic unwinds, releases it.
pub struct HeldJob {
    jobs: Arc<HeldJobs>,
}

impl Drop for HeldJob {
    fn drop(&mut self) {
        self.jobs.count.fetch_sub(1, Ordering::AcqRel);
        self.jobs.released.notify_one();
    }
}

/// A fetched job with its place in [`HeldJobs`].
pub struct SlotJob {
    pub job: FetchedJob,
    pub held: HeldJob,
}

/// The slot tasks and the channel that feeds them.
pub struct JobSlots {
    sender: Option<mpsc::Sender<SlotJob>>,
    receiver: Arc<Mutex<mpsc::Receiver<SlotJob>>>,
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
    database_config: tokio_postgres::Config,
    shutdown: watch::Receiver<bool>,
}

impl JobSlots {
    /// Starts one slot task per database slot. The channel has room for `capacity` jobs,
    /// the most the fetch loop holds at once, so sending into it does not wait.
    pub fn start(
        database_slots: Vec<DatabaseSlot>,
        capacity: usize,
        shared: Arc<Shared>,
        database_config: tokio_postgres::Config,
        shutdown: watch::Receiver<bool>,
    ) -> JobSlots {
        let (sender, receiver) = mpsc::channel(capacity);
        let mut slots = JobSlots {
            sender: Some(sender),
            receiver: Arc::new(Mutex::new(receiver)),
            tasks: JoinSet::new(),
            shared,
            database_config,
            shutdown,
        };
        for database in database_slots {
            slots.spawn_slot(database);
        }
        slots
    }

    fn spawn_slot(&mut self, database: DatabaseSlot) {
        self.tasks.spawn(run_slot(
            database,
            Arc::clone(&self.receiver),
            Arc::clone(&self.shared),
            self.shutdown.clone(),
        ));
    }

    /// Hands a fetched job to the next free slot.
    pub async fn submit(&self, job: SlotJob) {
        let Some(sender) = &self.sender else {
            return;
        };
        // The receiver is shared with `self`, so it outlives the sender and sending cannot
        // fail.
        let _ = sender.send(job).await;
    }

    /// Returns the number of jobs waiting in the channel for a slot.
    pub fn waiting(&self) -> usize {
        self.sender
            .as_ref()
            .map_or(0, |sender| sender.max_capacity() - sender.capacity())
    }

    /// Waits until a slot task ends, which happens only when it panicked, and starts a
    /// new one in its place. Never returns while every slot task runs.
    pub async fn replace_failed_slot(&mut self) {
        let Some(ended) = self.tasks.join_next().await else {
            return std::future::pending().await;
        };
        if let Err(error) = ended {
            error!(
                "A job slot failed ({}); its job stays in flight until this worker restarts, \
                 and a new slot takes its place",
                error_chain(&error)
            );
        }
        self.spawn_slot(DatabaseSlot::new(self.database_config.clone(), None));
    }

    /// Stops taking jobs and waits up to `drain_timeout` for the running ones, then stops
    /// the rest. Jobs still waiting in the channel go back to the queue at once. Jobs
    /// that were stopped stay in the in-flight list for the caller to return.
    pub async fn drain(&mut self, held: &HeldJobs, drain_timeout: Duration) {
        let running = held.count().saturating_sub(self.waiting());
        self.sender = None;

        if running > 0 {
            info!(
                "Waiting up to {} s for {running} running job(s) to finish",
                drain_timeout.as_secs()
            );
        }
        let finished = timeout(drain_timeout, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if finished.is_ok() {
            if running > 0 {
                info!("All running jobs finished");
            }
            return;
        }

        warn!(
            "{} job(s) did not finish within the drain timeout of {} s; stopping them",
            held.count(),
            drain_timeout.as_secs()
        );
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Runs jobs from `receiver` one after another until the channel closes. After a
/// shutdown request it runs none and returns the jobs it receives to the queue instead.
async fn run_slot(
    mut database: DatabaseSlot,
    receiver: Arc<Mutex<mpsc::Receiver<SlotJob>>>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    loop {
        // The lock is held while waiting, so one idle slot waits on the channel and the
        // others wait on the lock.
        let next = receiver.lock().await.recv().await;
        let Some(SlotJob { job, held }) = next else {
            return;
        };

        if *shutdown.borrow() {
            return_unstarted(&shared, job, &receiver).await;
            drop(held);
            continue;
        }

        database = run_job(job, database, Arc::clone(&shared)).await;
        drop(held);
    }
}

/// Returns `job` and every job still waiting in the channel to the head of the queue, in
/// their order, so that other workers can take them during the drain.
async fn return_unstarted(
    shared: &Shared,
    job: FetchedJob,
    receiver: &Mutex<mpsc::Receiver<SlotJob>>,
) {
    let mut raws = vec![job.raw];
    {
        let mut receiver = receiver.lock().await;
        while let Ok(SlotJob { job, .. }) = receiver.try_recv() {
            raws.push(job.raw);
        }
    }

    let mut queue = shared.queue.clone();
    match queue.return_jobs(&raws).await {
        Ok(returned) => info!("Returned {returned} job(s) that had not started to the queue"),
        // They stay in the in-flight list, which the shutdown returns at its end.
        Err(error) => warn!(
            "Returning {} job(s) that had not started failed: {}",
            raws.len(),
            shared.scrub(&error_chain(&error))
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_jobs_count_until_guard_drops() {
        let jobs = Arc::new(HeldJobs::default());

        let first = jobs.hold();
        let second = jobs.hold();
        assert_eq!(jobs.count(), 2);

        drop(first);
        assert_eq!(jobs.count(), 1);
        drop(second);
        assert_eq!(jobs.count(), 0);
    }
}
