//! The running lab as a `--lab` command uses it: the SSH identity, the pinned host keys, the
//! secrets and the control namespace to run in.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use super::error::LabError;
use super::host::{self, HostDirs};
use super::net::{self, CONTROL_NETNS};
use super::ssh;
use super::state::{self, LabPaths, LabState};

/// A running lab, as seen by a command run with `--lab`.
#[derive(Clone)]
pub struct LabContext {
    pub state_dir: PathBuf,
    /// Private key that every lab host accepts for its SSH user.
    pub identity_file: PathBuf,
    /// known_hosts file that pins every lab host's key at its address.
    pub known_hosts_file: PathBuf,
    /// Secret values by environment variable name: the variable's value when it is set,
    /// else the value the lab generated.
    pub secrets: BTreeMap<String, String>,
    /// Network namespace from which the lab hosts, and only they, are reachable.
    pub control_netns: String,
    pub hosts: Vec<LabHostContext>,
}

/// One lab host's address and SSH settings, for a `--lab` command.
#[derive(Debug, Clone)]
pub struct LabHostContext {
    pub name: String,
    pub address: Ipv4Addr,
    pub ssh_port: u16,
    pub ssh_user: String,
    /// Whether the host's container ran when the context was loaded.
    pub running: bool,
}

/// Prints secret names with `<redacted>` in place of their values.
impl fmt::Debug for LabContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LabContext")
            .field("state_dir", &self.state_dir)
            .field("identity_file", &self.identity_file)
            .field("known_hosts_file", &self.known_hosts_file)
            .field(
                "secrets",
                &self
                    .secrets
                    .keys()
                    .map(|name| (name, "<redacted>"))
                    .collect::<BTreeMap<_, _>>(),
            )
            .field("control_netns", &self.control_netns)
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl LabContext {
    /// Options and destination for `ssh` to a lab host (without the program name), for a
    /// process that is already in the control namespace.
    pub fn ssh_args(&self, host_name: &str) -> Result<Vec<OsString>, LabError> {
        let host = self.host(host_name)?;
        Ok(ssh::ssh_args(
            &self.identity_file,
            &self.known_hosts_file,
            &host.ssh_user,
            host.address,
            host.ssh_port,
        ))
    }

    pub fn host(&self, host_name: &str) -> Result<&LabHostContext, LabError> {
        self.hosts
            .iter()
            .find(|host| host.name == host_name)
            .ok_or_else(|| LabError::UnknownHost {
                name: host_name.to_string(),
                known: self
                    .hosts
                    .iter()
                    .map(|host| host.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// Loads the running lab's context.
///
/// Fails with `LabError::NotRunning` when the lab has no state, its control namespace is
/// missing or none of its hosts runs. A lab with only some hosts running loads, and each
/// host's `running` flag shows whether it runs.
pub fn load_context() -> Result<LabContext, LabError> {
    let paths = LabPaths::from_env();
    let Some(lab) = LabState::load(&paths)? else {
        return Err(LabError::NotRunning);
    };
    if !net::netns_exists(CONTROL_NETNS) {
        return Err(LabError::NotRunning);
    }

    let hosts: Vec<LabHostContext> = lab
        .hosts
        .iter()
        .map(|record| LabHostContext {
            name: record.name.clone(),
            address: record.address,
            ssh_port: record.ssh_port,
            ssh_user: record.ssh_user.clone(),
            running: host::is_running(&HostDirs::new(&paths, &record.name), record),
        })
        .collect();
    if !hosts.iter().any(|host| host.running) {
        return Err(LabError::NotRunning);
    }

    Ok(LabContext {
        identity_file: paths.identity_file(),
        known_hosts_file: paths.known_hosts_file(),
        secrets: state::resolve_secrets(&paths, &lab.secret_env_names)?,
        control_netns: CONTROL_NETNS.to_string(),
        state_dir: paths.state_dir,
        hosts,
    })
}

/// Moves the calling process into the lab's control namespace with setns(2), so that every
/// socket it opens later, and every child process it starts, reaches the lab hosts and
/// nothing else.
///
/// setns(2) moves only the calling thread, so this fails with `LabError::ThreadsRunning`
/// unless the process has a single thread: call it from `main` before starting a runtime.
pub fn enter_control_namespace(ctx: &LabContext) -> Result<(), LabError> {
    let threads = count_threads();
    if threads != 1 {
        return Err(LabError::ThreadsRunning { threads });
    }
    let path = net::netns_path(&ctx.control_netns);
    net::enter_network_namespace(&path).map_err(|source| LabError::EnterNamespace { path, source })
}

/// Builds the command for `lab ssh HOST [ARGS...]`: `ip netns exec` into the control
/// namespace, then `ssh` with the lab identity and pinned host key, then `extra_args`.
pub fn ssh_command<I, S>(host_name: &str, extra_args: I) -> Result<Command, LabError>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let paths = LabPaths::from_env();
    let lab = LabState::load(&paths)?.ok_or(LabError::NotRunning)?;
    let host = lab.host(host_name).ok_or_else(|| LabError::UnknownHost {
        name: host_name.to_string(),
        known: lab
            .hosts
            .iter()
            .map(|host| host.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    Ok(ssh::ssh_command_in_netns(
        &paths,
        CONTROL_NETNS,
        host,
        extra_args,
    ))
}

/// Number of threads of this process, from /proc/self/status (0 when it cannot be read).
fn count_threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let ctx = LabContext {
            state_dir: PathBuf::from("/lab"),
            identity_file: PathBuf::from("/lab/id_ed25519"),
            known_hosts_file: PathBuf::from("/lab/known_hosts"),
            secrets: BTreeMap::from([(
                "YAMETEE_PG_PASSWORD".to_string(),
                "hunter2secret".to_string(),
            )]),
            control_netns: "ytd-ctl".into(),
            hosts: vec![],
        };
        let printed = format!("{ctx:?}");
        assert!(printed.contains("YAMETEE_PG_PASSWORD"), "{printed}");
        assert!(!printed.contains("hunter2secret"), "{printed}");
    }

    #[test]
    fn unknown_host_lists_known() {
        let ctx = LabContext {
            state_dir: PathBuf::from("/lab"),
            identity_file: PathBuf::from("/lab/id_ed25519"),
            known_hosts_file: PathBuf::from("/lab/known_hosts"),
            secrets: BTreeMap::new(),
            control_netns: "ytd-ctl".into(),
            hosts: vec![LabHostContext {
                name: "web".into(),
                address: Ipv4Addr::new(192, 168, 120, 50),
                ssh_port: 22,
                ssh_user: "deploy".into(),
                running: true,
            }],
        };
        let error = ctx.ssh_args("db").unwrap_err().to_string();
        assert_eq!(error, "unknown lab host `db`; the lab has: web");
        assert!(ctx.ssh_args("web").is_ok());
    }
}
