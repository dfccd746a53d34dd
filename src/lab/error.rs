//! Errors of the lab commands.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can make `lab up`, `lab down`, `lab status` or `--lab` fail.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root, because it creates network namespaces, overlay mounts and containers; run it as root")]
    NotRoot,

    #[error("`{program}` not found in PATH; install the Debian package `{package}`")]
    MissingTool {
        program: &'static str,
        package: &'static str,
    },

    #[error("lab is not running; run `yametee-deploy lab up`")]
    NotRunning,

    #[error("invalid lab host list: {reason}")]
    InvalidSpec { reason: String },

    #[error("unknown lab host `{name}`; the lab has: {known}")]
    UnknownHost { name: String, known: String },

    #[error("failed to {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed ({status}){}", format_detail(detail))]
    CommandFailed {
        command: String,
        status: String,
        detail: String,
    },

    #[error("`{command}` timed out after {} s and was killed", timeout.as_secs())]
    CommandTimedOut { command: String, timeout: Duration },

    #[error("no Debian mirror found in the apt sources ({checked}); add a `deb` entry for a Debian release there")]
    NoMirror { checked: String },

    #[error("invalid lab state file {path}; run `yametee-deploy lab down` to reset the lab")]
    InvalidState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("another lab command is running (it holds the lock {path}); wait for it to finish")]
    Locked { path: PathBuf },

    #[error("processes {pids:?} still run in {path} and could not be stopped")]
    StrayProcesses { path: PathBuf, pids: Vec<u32> },

    #[error("failed to mount the overlay root of lab host `{host}` on {path}")]
    Mount {
        host: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to unmount {path}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("lab host `{host}` exited while booting ({status}); see its console log {log}")]
    HostExited {
        host: String,
        status: String,
        log: PathBuf,
    },

    #[error("timed out after {} s waiting for {waiting_for} on lab hosts {hosts}; see their console logs under {hosts_dir}", timeout.as_secs())]
    BootTimedOut {
        waiting_for: &'static str,
        hosts: String,
        timeout: Duration,
        hosts_dir: PathBuf,
    },

    #[error("ssh to lab host `{host}` failed: {detail}")]
    Ssh { host: String, detail: String },

    #[error("failed to enter the network namespace {path}")]
    EnterNamespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot enter the lab network namespace: the process already runs {threads} threads, and setns(2) moves only the calling one; enter it before starting any thread")]
    ThreadsRunning { threads: usize },
}

/// Formats a command's captured stderr as a suffix of its error message.
fn format_detail(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl LabError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> LabError {
        let path = path.into();
        move |source| LabError::Io {
            action,
            path,
            source,
        }
    }
}
