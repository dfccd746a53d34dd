//! Current state of a host: the content of its managed files, its packages, users, services,
//! firewall, worker release and pending restarts. Reading it changes nothing on the host.

use std::collections::{BTreeMap, BTreeSet};

use futures::future::try_join_all;
use serde::Serialize;

use crate::render::{worker_paths, DesiredHost};
use crate::ssh::{Remote, RemoteCommand, SshError};

/// File on each host where apply records restarts it still owes, so a run interrupted between
/// writing a file and restarting its service restarts it on the next apply.
pub const PENDING_RESTARTS_FILE: &str = "/var/lib/yametee-deploy/pending-restarts";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteFile {
    pub mode: u32,
    pub owner: String,
    pub group: String,
    #[serde(skip)]
    pub content: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ServiceState {
    pub enabled: bool,
    pub active: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FirewallState {
    pub active: bool,
    pub incoming_denied: bool,
    /// Rules as `ufw show added` lists them, without the leading `ufw`.
    pub rules: Vec<String>,
}

/// CPU architecture and C library of a host, to check it can run the worker binary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Platform {
    /// `uname -m`, such as `x86_64` or `aarch64`.
    pub machine: String,
    /// glibc version such as `2.36`; `None` when the host has no glibc.
    pub glibc: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HostFacts {
    pub files: BTreeMap<String, Option<RemoteFile>>,
    pub missing_packages: Vec<String>,
    pub missing_users: Vec<String>,
    pub services: BTreeMap<String, ServiceState>,
    pub firewall: FirewallState,
    /// Name of the release directory `current` points at, on worker hosts.
    pub worker_release: Option<String>,
    pub pending_restarts: BTreeSet<String>,
    pub platform: Platform,
}

/// Reads everything `plan` compares against `desired`.
pub async fn gather(remote: &Remote, desired: &DesiredHost) -> Result<HostFacts, SshError> {
    let mut paths: BTreeSet<&str> = desired
        .files
        .iter()
        .map(|file| file.path.as_str())
        .collect();
    paths.extend(desired.last_lines.iter().map(|line| line.path.as_str()));
    let files = try_join_all(paths.iter().map(|path| read_file(remote, path)));

    let units: Vec<&str> = desired
        .services
        .iter()
        .map(|service| service.unit.as_str())
        .collect();
    let is_worker = desired.roles.contains(&crate::inventory::Role::Worker);
    let release = async {
        if is_worker {
            current_release(remote).await
        } else {
            Ok(None)
        }
    };
    let (
        files,
        missing_packages,
        missing_users,
        services,
        firewall,
        pending,
        platform,
        worker_release,
    ) = tokio::try_join!(
        files,
        missing_packages(remote, &desired.packages),
        missing_users(remote, &desired.system_users),
        service_states(remote, &units),
        firewall_state(remote),
        pending_restarts(remote),
        platform(remote),
        release,
    )?;

    Ok(HostFacts {
        files: paths
            .iter()
            .map(|path| path.to_string())
            .zip(files)
            .collect(),
        missing_packages,
        missing_users,
        services,
        firewall,
        worker_release,
        pending_restarts: pending,
        platform,
    })
}

/// Reads a file as root; `None` when it does not exist.
pub async fn read_file(remote: &Remote, path: &str) -> Result<Option<RemoteFile>, SshError> {
    let script =
        r#"if [ -e "$1" ]; then stat -c '%a %U %G' -- "$1" && cat -- "$1"; else echo missing; fi"#;
    let command = RemoteCommand::script(&format!("read {path}"), script, &[path]).as_root();
    let output = remote.run(&command).await?;
    Ok(parse_file_listing(&output))
}

fn parse_file_listing(output: &str) -> Option<RemoteFile> {
    let (header, content) = output.split_once('\n').unwrap_or((output, ""));
    let mut fields = header.split_whitespace();
    let mode = u32::from_str_radix(fields.next()?, 8).ok()?;
    let owner = fields.next()?.to_string();
    let group = fields.next()?.to_string();
    Some(RemoteFile {
        mode,
        owner,
        group,
        content: content.to_string(),
    })
}

async fn missing_packages(remote: &Remote, packages: &[String]) -> Result<Vec<String>, SshError> {
    if packages.is_empty() {
        return Ok(Vec::new());
    }
    // dpkg-query exits 1 when a package is unknown, and still prints the others.
    let command = RemoteCommand::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\\n"])
        .args(packages.iter().cloned());
    let output = remote.output(&command).await?;
    let installed: BTreeSet<&str> = output
        .stdout
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| *status == "installed")
        .map(|(name, _)| name)
        .collect();
    Ok(packages
        .iter()
        .filter(|package| !installed.contains(package.as_str()))
        .cloned()
        .collect())
}

async fn missing_users(remote: &Remote, users: &[String]) -> Result<Vec<String>, SshError> {
    let lookups = users.iter().map(|user| async move {
        let output = remote
            .output(&RemoteCommand::new("getent").args(["passwd", user]))
            .await?;
        Ok::<_, SshError>((!output.success()).then(|| user.clone()))
    });
    Ok(try_join_all(lookups).await?.into_iter().flatten().collect())
}

async fn service_states(
    remote: &Remote,
    units: &[&str],
) -> Result<BTreeMap<String, ServiceState>, SshError> {
    let lookups = units.iter().map(|unit| async move {
        let enabled = RemoteCommand::new("systemctl").args(["is-enabled", unit]);
        let active = RemoteCommand::new("systemctl").args(["is-active", unit]);
        let (enabled, active) = tokio::try_join!(remote.output(&enabled), remote.output(&active))?;
        let state = ServiceState {
            enabled: enabled.stdout.trim() == "enabled",
            active: active.stdout.trim() == "active",
        };
        Ok::<_, SshError>((unit.to_string(), state))
    });
    Ok(try_join_all(lookups).await?.into_iter().collect())
}

pub async fn firewall_state(remote: &Remote) -> Result<FirewallState, SshError> {
    let status = RemoteCommand::new("ufw")
        .args(["status", "verbose"])
        .as_root();
    let added = RemoteCommand::new("ufw").args(["show", "added"]).as_root();
    let (status, added) = tokio::try_join!(remote.run(&status), remote.run(&added))?;
    Ok(parse_firewall(&status, &added))
}

fn parse_firewall(status: &str, added: &str) -> FirewallState {
    let active = status.lines().any(|line| line.trim() == "Status: active");
    let incoming_denied = status
        .lines()
        .any(|line| line.starts_with("Default:") && line.contains("deny (incoming)"));
    let rules = added
        .lines()
        .filter_map(|line| line.trim().strip_prefix("ufw "))
        .map(String::from)
        .collect();
    FirewallState {
        active,
        incoming_denied,
        rules,
    }
}

async fn pending_restarts(remote: &Remote) -> Result<BTreeSet<String>, SshError> {
    let file = read_file(remote, PENDING_RESTARTS_FILE).await?;
    Ok(file
        .map(|file| {
            file.content
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default())
}

async fn platform(remote: &Remote) -> Result<Platform, SshError> {
    let machine = RemoteCommand::new("uname").arg("-m");
    let libc = RemoteCommand::new("getconf").arg("GNU_LIBC_VERSION");
    let (machine, libc) = tokio::try_join!(remote.run(&machine), remote.output(&libc))?;
    let glibc = libc.stdout.trim().strip_prefix("glibc ").map(String::from);
    Ok(Platform {
        machine: machine.trim().to_string(),
        glibc,
    })
}

async fn current_release(remote: &Remote) -> Result<Option<String>, SshError> {
    let output = remote
        .output(&RemoteCommand::new("readlink").arg(worker_paths::CURRENT_LINK))
        .await?;
    if !output.success() {
        return Ok(None);
    }
    Ok(output
        .stdout
        .trim()
        .rsplit('/')
        .next()
        .map(String::from)
        .filter(|name| !name.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_listing_keeps_content_exactly() {
        let file = parse_file_listing("640 redis redis\nbind 1.2.3.4\n\n").expect("listing");
        assert_eq!(file.mode, 0o640);
        assert_eq!(file.owner, "redis");
        assert_eq!(file.content, "bind 1.2.3.4\n\n");
        assert_eq!(parse_file_listing("missing\n"), None);
    }

    #[test]
    fn firewall_status_and_rules_are_parsed() {
        let status = "Status: active\nLogging: on (low)\nDefault: deny (incoming), allow (outgoing), disabled (routed)\n";
        let added = "Added user rules (see 'ufw status' for running firewall):\nufw allow 22/tcp comment 'ssh'\nufw allow 80/tcp\n";
        let state = parse_firewall(status, added);
        assert!(state.active);
        assert!(state.incoming_denied);
        assert_eq!(
            state.rules,
            vec!["allow 22/tcp comment 'ssh'", "allow 80/tcp"]
        );

        let inactive = parse_firewall(
            "Status: inactive\n",
            "Added user rules (see 'ufw status' for running firewall):\n(None)\n",
        );
        assert!(!inactive.active);
        assert!(inactive.rules.is_empty());
    }
}
