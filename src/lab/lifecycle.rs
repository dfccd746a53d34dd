//! `lab up`, `lab down` and `lab status`: bring the lab to the inventory's hosts, tear it
//! down, and report on it.
//!
//! `up` follows a changed inventory instead of refusing it: hosts that left the inventory are
//! removed, hosts whose address, SSH port or SSH user changed are removed and created afresh
//! (their changes are lost), and new hosts are created. Role changes need no new host,
//! because every host has every role's packages.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use super::cgroup;
use super::error::LabError;
use super::host::{self, HostDirs};
use super::image;
use super::net::{self, HostNetwork, CONTROL_NETNS};
use super::ssh;
use super::state::{self, HostRecord, LabLock, LabPaths, LabState};
use super::status::{HostStatus, LabStatus};
use super::system;
use super::{LabHost, LabSpec};

/// Maximum time from the first container start until every host's sshd accepts connections
/// and its systemd has finished booting. Four hosts take about 2 s and twenty about 8 s on a
/// 2-core VM, so this leaves room for slow disks.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Time the guests get to power off after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Maximum time a status probe waits for a host's sshd banner.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause between two rounds of boot probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// Brings the lab to `spec` and waits until every host accepts SSH and has finished booting.
///
/// The first run builds the base image (about a minute). Later runs boot only the hosts that
/// do not run, and return at once when all do. Progress goes to stderr.
pub fn up(spec: &LabSpec) -> Result<LabStatus, LabError> {
    system::require_root()?;
    system::require_tools()?;
    validate_spec(spec)?;
    let plan = net::plan_network(&spec.hosts)?;

    let paths = LabPaths::from_env();
    paths.create_state_dir()?;
    let _lock = LabLock::acquire(&paths.lock_file())?;

    let base_image = image::ensure_base_image(&paths.cache_dir)?;
    let lab_public_key = ssh::ensure_lab_identity(&paths)?;
    state::ensure_secrets(&paths, &spec.secret_env_names)?;

    let mut lab = LabState::load(&paths)?.unwrap_or_default();
    lab.secret_env_names = spec.secret_env_names.clone();
    remove_outdated_hosts(&paths, &mut lab, spec, &base_image, &lab_public_key)?;
    lab.base_image = Some(base_image.clone());
    lab.save(&paths)?;

    net::ensure_control_network(&plan)?;
    for (host, network) in spec.hosts.iter().zip(&plan.hosts) {
        create_host(
            &paths,
            &mut lab,
            host,
            network,
            &base_image,
            &lab_public_key,
        )?;
    }
    ssh::write_known_hosts(&paths, &lab.hosts)?;

    let booted = boot_stopped_hosts(&paths, &mut lab)?;
    wait_for_sshd(&paths, &lab, booted)?;
    collect_status(&paths, &lab)
}

/// Stops every lab host, unmounts the overlays, deletes the network namespaces and removes
/// the hosts' files. The lab's SSH identity, its secrets and the base image are kept.
///
/// Stops only the processes the lab started: the recorded systemd-nspawn processes and the
/// container processes in the hosts' network namespaces. Succeeds when nothing is up. A failing step does
/// not stop the others; the first error is returned at the end.
pub fn down() -> Result<(), LabError> {
    system::require_root()?;
    let paths = LabPaths::from_env();
    let _lock = if paths.state_dir.is_dir() {
        Some(LabLock::acquire(&paths.lock_file())?)
    } else {
        None
    };

    // A state file that cannot be read must not stop the reset; the sweeps below find what
    // the lab created by its names and directories.
    let lab = match LabState::load(&paths) {
        Ok(lab) => lab.unwrap_or_default(),
        Err(error) => {
            eprintln!("lab: ignoring the state file: {error}");
            LabState::default()
        }
    };

    let recorded: Vec<(HostDirs, HostRecord)> = lab
        .hosts
        .iter()
        .map(|record| (HostDirs::new(&paths, &record.name), record.clone()))
        .collect();
    host::stop(&recorded, STOP_GRACE);

    let mut netns_names: Vec<String> = lab
        .hosts
        .iter()
        .map(|record| record.netns.clone())
        .collect();
    netns_names.extend(lab_host_netns_on_disk());
    netns_names.sort();
    netns_names.dedup();

    let mut errors = Vec::new();
    for netns in &netns_names {
        let left = host::kill_container_processes(netns);
        if !left.is_empty() {
            errors.push(LabError::StrayProcesses {
                path: net::netns_path(netns),
                pids: left,
            });
        }
    }
    for dirs in host_dirs_on_disk(&paths) {
        if let Err(error) = system::unmount(&dirs.root) {
            errors.push(error);
        }
    }

    netns_names.push(CONTROL_NETNS.to_string());
    for netns in &netns_names {
        if let Err(error) = net::delete_netns(netns) {
            errors.push(error);
        }
    }

    for dir in cgroup::remove_lab_cgroups() {
        eprintln!(
            "lab: failed to remove the cgroup {}; a process may still be in it",
            dir.display()
        );
    }

    if errors.is_empty() {
        if let Err(error) = system::remove_tree(&paths.hosts_dir()) {
            errors.push(error);
        }
        for file in [paths.state_file(), paths.known_hosts_file()] {
            if let Err(error) = std::fs::remove_file(&file) {
                if error.kind() != std::io::ErrorKind::NotFound {
                    errors.push(LabError::io("remove", file)(error));
                }
            }
        }
    }

    for error in errors.iter().skip(1) {
        eprintln!("lab: {error}");
    }
    errors.into_iter().next().map_or(Ok(()), Err)
}

/// Reports every lab host: its address, whether its container runs and whether its sshd
/// accepts connections. A lab that is not up has no hosts.
pub fn status() -> Result<LabStatus, LabError> {
    system::require_root()?;
    let paths = LabPaths::from_env();
    let lab = LabState::load(&paths)?.unwrap_or_default();
    collect_status(&paths, &lab)
}

/// Checks what the network plan does not: SSH users and ports.
fn validate_spec(spec: &LabSpec) -> Result<(), LabError> {
    if spec.hosts.is_empty() {
        return Err(LabError::InvalidSpec {
            reason: "the inventory has no host".into(),
        });
    }
    for host in &spec.hosts {
        validate_ssh_user(&host.ssh_user).map_err(|reason| LabError::InvalidSpec {
            reason: format!("host `{}`: {reason}", host.name),
        })?;
        if host.ssh_port == 0 {
            return Err(LabError::InvalidSpec {
                reason: format!("host `{}`: SSH port 0 is not a valid port", host.name),
            });
        }
    }
    Ok(())
}

/// Accepts the portable user names that useradd takes by default. The name also becomes a
/// sudoers.d file name, and sudo skips such files when their name contains a dot.
fn validate_ssh_user(user: &str) -> Result<(), String> {
    let mut characters = user.chars();
    let valid_first = characters
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let valid_rest =
        characters.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid_first || !valid_rest || user.len() > 32 {
        return Err(format!(
            "SSH user `{user}` is not a valid user name; use up to 32 lowercase letters, digits, `_` and `-`, starting with a letter or `_`"
        ));
    }
    Ok(())
}

/// Names the reason a recorded host no longer matches the spec, or `None` when it still does.
fn outdated_reason(
    record: &HostRecord,
    expected: Option<&LabHost>,
    base_changed: bool,
    lab_public_key: &str,
) -> Option<&'static str> {
    let Some(expected) = expected else {
        return Some("it left the inventory");
    };
    if record.address != expected.address {
        return Some("its address changed");
    }
    if record.ssh_port != expected.ssh_port {
        return Some("its SSH port changed");
    }
    if record.ssh_user != expected.ssh_user {
        return Some("its SSH user changed");
    }
    if base_changed {
        return Some("the base image changed");
    }
    if record.prepared && record.authorized_key.as_deref() != Some(lab_public_key) {
        return Some("the lab's SSH key changed");
    }
    None
}

/// Removes the hosts that left the spec or whose settings changed, so they are created anew.
fn remove_outdated_hosts(
    paths: &LabPaths,
    lab: &mut LabState,
    spec: &LabSpec,
    base_image: &Path,
    lab_public_key: &str,
) -> Result<(), LabError> {
    let base_changed = lab
        .base_image
        .as_deref()
        .is_some_and(|recorded| recorded != base_image);
    let outdated: Vec<(HostRecord, &'static str)> = lab
        .hosts
        .iter()
        .filter_map(|record| {
            let expected = spec.hosts.iter().find(|host| host.name == record.name);
            outdated_reason(record, expected, base_changed, lab_public_key)
                .map(|reason| (record.clone(), reason))
        })
        .collect();

    for (record, reason) in outdated {
        eprintln!("lab: removing host {} because {reason}", record.name);
        let dirs = HostDirs::new(paths, &record.name);
        host::stop(&[(dirs.clone(), record.clone())], STOP_GRACE);
        system::remove_tree(&dirs.dir)?;
        net::delete_netns(&record.netns)?;
        lab.hosts.retain(|kept| kept.name != record.name);
        lab.save(paths)?;
    }
    Ok(())
}

/// Creates whatever of one host is missing: its record, network, overlay root and prepared
/// upper layer. A host prepared earlier only gets its network and mount checked.
fn create_host(
    paths: &LabPaths,
    lab: &mut LabState,
    host: &LabHost,
    network: &HostNetwork,
    base_image: &Path,
    lab_public_key: &str,
) -> Result<(), LabError> {
    if lab.host(&host.name).is_none() {
        lab.hosts.push(HostRecord {
            name: host.name.clone(),
            address: host.address,
            ssh_port: host.ssh_port,
            ssh_user: host.ssh_user.clone(),
            roles: host.roles.clone(),
            netns: network.netns.clone(),
            control_veth: network.control_veth.clone(),
            prepared: false,
            host_public_key: None,
            authorized_key: None,
            nspawn_pid: None,
            nspawn_start_time: None,
        });
        lab.save(paths)?;
    }

    net::ensure_host_network(network)?;

    let dirs = HostDirs::new(paths, &host.name);
    let record = lab
        .host_mut(&host.name)
        .expect("the host was recorded above");
    record.roles = host.roles.clone();
    if record.prepared {
        return host::mount_root(&dirs, base_image, &host.name);
    }

    // A host that is recorded but not prepared was interrupted while being written: start over.
    system::remove_tree(&dirs.dir)?;
    eprintln!("lab: creating host {} at {}", host.name, host.address);
    host::mount_root(&dirs, base_image, &host.name)?;
    let host_public_key = host::prepare_root(&dirs, record, lab_public_key)?;
    record.host_public_key = Some(host_public_key);
    record.authorized_key = Some(lab_public_key.to_string());
    record.prepared = true;
    lab.save(paths)
}

/// Boots every host whose container does not run, records its process, and returns the
/// started processes by host name.
fn boot_stopped_hosts(
    paths: &LabPaths,
    lab: &mut LabState,
) -> Result<Vec<(String, Child)>, LabError> {
    let mut booted = Vec::new();
    for index in 0..lab.hosts.len() {
        let dirs = HostDirs::new(paths, &lab.hosts[index].name);
        if host::is_running(&dirs, &lab.hosts[index]) {
            continue;
        }

        // A container whose systemd-nspawn was killed may still run on this root.
        let left = host::kill_container_processes(&lab.hosts[index].netns);
        if !left.is_empty() {
            return Err(LabError::StrayProcesses {
                path: dirs.root,
                pids: left,
            });
        }

        eprintln!("lab: booting {}", lab.hosts[index].name);
        let child = host::boot(&dirs, &lab.hosts[index])?;
        let record = &mut lab.hosts[index];
        record.nspawn_pid = Some(child.id());
        record.nspawn_start_time =
            system::process_start_time(child.id()).map(|(start_time, _)| start_time);
        booted.push((record.name.clone(), child));
        lab.save(paths)?;
    }
    Ok(booted)
}

/// Waits until every host's sshd accepts connections. For the hosts just booted, it then
/// waits over SSH, with the lab identity and pinned host key, until systemd has finished booting.
fn wait_for_sshd(
    paths: &LabPaths,
    lab: &LabState,
    mut booted: Vec<(String, Child)>,
) -> Result<(), LabError> {
    let started = Instant::now();
    let deadline = started + BOOT_TIMEOUT;
    let mut waiting: Vec<&HostRecord> = lab.hosts.iter().collect();

    loop {
        for (name, child) in booted.iter_mut() {
            if let Ok(Some(exit)) = child.try_wait() {
                return Err(LabError::HostExited {
                    host: name.clone(),
                    status: exit.to_string(),
                    log: HostDirs::new(paths, name).console_log,
                });
            }
        }

        let targets: Vec<SocketAddr> = waiting
            .iter()
            .map(|host| SocketAddr::from((host.address, host.ssh_port)))
            .collect();
        let answered = ssh::probe_ssh_banners(CONTROL_NETNS, &targets, Duration::from_millis(500));
        let mut still_waiting = Vec::new();
        for (host, answered) in waiting.into_iter().zip(answered) {
            if answered {
                if booted.iter().any(|(name, _)| *name == host.name) {
                    eprintln!(
                        "lab: {} accepts SSH after {:.1} s",
                        host.name,
                        started.elapsed().as_secs_f64()
                    );
                }
            } else {
                still_waiting.push(host);
            }
        }
        waiting = still_waiting;

        if waiting.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(LabError::BootTimedOut {
                waiting_for: "sshd",
                hosts: waiting
                    .iter()
                    .map(|host| host.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                timeout: BOOT_TIMEOUT,
                hosts_dir: paths.hosts_dir(),
            });
        }
        std::thread::sleep(PROBE_INTERVAL);
    }

    let booted_names: Vec<String> = booted.into_iter().map(|(name, _)| name).collect();
    wait_for_boot_finished(paths, lab, &booted_names, deadline)?;
    if !booted_names.is_empty() {
        eprintln!(
            "lab: {} host{} up after {:.1} s",
            booted_names.len(),
            if booted_names.len() == 1 { "" } else { "s" },
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Runs `systemctl is-system-running --wait` over SSH on each named host, in parallel, and
/// fails unless each reports `running` or `degraded` before `deadline`. A degraded host is
/// reported but accepted, because a failed unit is something the deploy tool should see.
fn wait_for_boot_finished(
    paths: &LabPaths,
    lab: &LabState,
    names: &[String],
    deadline: Instant,
) -> Result<(), LabError> {
    let timeout = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    let checks: Vec<_> = names
        .iter()
        .filter_map(|name| lab.host(name))
        .map(|record| {
            let mut command = ssh::ssh_command_in_netns(
                paths,
                CONTROL_NETNS,
                record,
                ["systemctl", "is-system-running", "--wait"],
            );
            let name = record.name.clone();
            std::thread::spawn(move || (name, system::run_unchecked(&mut command, timeout)))
        })
        .collect();

    let mut first_error = None;
    for check in checks {
        let (name, result) = check.join().expect("the boot check thread does not panic");
        let outcome = result.and_then(|output| {
            let state = String::from_utf8_lossy(&output.stdout).trim().to_string();
            match state.as_str() {
                "running" => Ok(()),
                "degraded" => {
                    eprintln!("lab: {name} booted with failed units; see `yametee-deploy lab ssh {name} systemctl --failed`");
                    Ok(())
                }
                _ => Err(LabError::Ssh {
                    host: name.clone(),
                    detail: format!(
                        "`systemctl is-system-running --wait` returned `{state}` ({}){}",
                        output.status,
                        stderr_suffix(&output.stderr)
                    ),
                }),
            }
        });
        if let Err(error) = outcome {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn stderr_suffix(stderr: &[u8]) -> String {
    let text = system::last_lines(&String::from_utf8_lossy(stderr), 4);
    if text.is_empty() {
        text
    } else {
        format!(": {text}")
    }
}

fn collect_status(paths: &LabPaths, lab: &LabState) -> Result<LabStatus, LabError> {
    let network_up = net::netns_exists(CONTROL_NETNS);
    let running: Vec<bool> = lab
        .hosts
        .iter()
        .map(|record| host::is_running(&HostDirs::new(paths, &record.name), record))
        .collect();

    let reachable = if network_up {
        let targets: Vec<SocketAddr> = lab
            .hosts
            .iter()
            .map(|record| SocketAddr::from((record.address, record.ssh_port)))
            .collect();
        ssh::probe_ssh_banners(CONTROL_NETNS, &targets, PROBE_TIMEOUT)
    } else {
        vec![false; lab.hosts.len()]
    };

    let hosts = lab
        .hosts
        .iter()
        .zip(running)
        .zip(reachable)
        .map(|((record, running), ssh_reachable)| HostStatus {
            name: record.name.clone(),
            address: record.address,
            ssh_port: record.ssh_port,
            ssh_user: record.ssh_user.clone(),
            roles: record.roles.clone(),
            running,
            pid: if running { record.nspawn_pid } else { None },
            ssh_reachable,
        })
        .collect();

    Ok(LabStatus {
        state_dir: paths.state_dir.clone(),
        control_netns: CONTROL_NETNS.to_string(),
        network_up,
        hosts,
    })
}

/// Host directories under the state directory, including those of hosts the state file no
/// longer records.
fn host_dirs_on_disk(paths: &LabPaths) -> Vec<HostDirs> {
    let Ok(entries) = std::fs::read_dir(paths.hosts_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.path().is_dir())
        .map(|entry| HostDirs::new(paths, &entry.file_name().to_string_lossy()))
        .collect()
}

/// Named network namespaces that carry the lab's host namespace prefix.
fn lab_host_netns_on_disk() -> Vec<String> {
    let prefix = net::host_netns_name("");
    let Ok(entries) = std::fs::read_dir(net::netns_path("")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&prefix))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn record() -> HostRecord {
        HostRecord {
            name: "worker".into(),
            address: Ipv4Addr::new(192, 168, 120, 45),
            ssh_port: 22,
            ssh_user: "deploy".into(),
            roles: vec!["worker".into()],
            netns: "ytd-h-worker".into(),
            control_veth: "vh-worker".into(),
            prepared: true,
            host_public_key: Some("ssh-ed25519 AAAA host".into()),
            authorized_key: Some("ssh-ed25519 BBBB lab".into()),
            nspawn_pid: None,
            nspawn_start_time: None,
        }
    }

    fn expected_host() -> LabHost {
        LabHost {
            name: "worker".into(),
            address: Ipv4Addr::new(192, 168, 120, 45),
            ssh_port: 22,
            ssh_user: "deploy".into(),
            roles: vec!["worker".into(), "web".into()],
        }
    }

    const LAB_KEY: &str = "ssh-ed25519 BBBB lab";

    #[test]
    fn outdated_only_on_relevant_changes() {
        assert_eq!(
            outdated_reason(&record(), Some(&expected_host()), false, LAB_KEY),
            None
        );
        assert_eq!(
            outdated_reason(&record(), None, false, LAB_KEY),
            Some("it left the inventory")
        );

        let mut moved = expected_host();
        moved.address = Ipv4Addr::new(192, 168, 120, 46);
        assert_eq!(
            outdated_reason(&record(), Some(&moved), false, LAB_KEY),
            Some("its address changed")
        );

        let mut other_port = expected_host();
        other_port.ssh_port = 2222;
        assert_eq!(
            outdated_reason(&record(), Some(&other_port), false, LAB_KEY),
            Some("its SSH port changed")
        );

        assert_eq!(
            outdated_reason(&record(), Some(&expected_host()), true, LAB_KEY),
            Some("the base image changed")
        );
        assert_eq!(
            outdated_reason(
                &record(),
                Some(&expected_host()),
                false,
                "ssh-ed25519 CCCC new"
            ),
            Some("the lab's SSH key changed")
        );
    }

    #[test]
    fn ssh_user_names_checked() {
        for user in ["deploy", "_svc", "ops-1", "root"] {
            assert!(validate_ssh_user(user).is_ok(), "{user} rejected");
        }
        for user in ["", "Deploy", "1ops", "first.last", "a b", &"u".repeat(33)] {
            assert!(validate_ssh_user(user).is_err(), "{user:?} accepted");
        }
    }

    #[test]
    fn spec_without_hosts_rejected() {
        let spec = LabSpec {
            hosts: vec![],
            secret_env_names: vec![],
        };
        let error = validate_spec(&spec).unwrap_err().to_string();
        assert_eq!(error, "invalid lab host list: the inventory has no host");
    }
}
