//! `status`: the queue, its workers and their journals on one screen, once or refreshed
//! in place.

mod monitor;
mod report;
mod snapshot;
mod watch;

pub use monitor::{journal_command, Monitor};
pub use report::{format_age, human, json, StatusReport, Style, WorkerHost};
pub use snapshot::{
    connect, read_snapshot, Counter, JobCounts, QueueSnapshot, RedisAddress, SnapshotError,
    WaitingJob, WorkerInstance, FAILED_COUNTER, FAILED_PER_MINUTE_PREFIX, HEARTBEAT_KEY_PREFIX,
    PROCESSED_COUNTER, PROCESSED_PER_MINUTE_PREFIX,
};
pub use watch::{run, Output};
