//! One lab host: its overlay root, the files that make it a distinct machine, and its
//! systemd-nspawn container.
//!
//! Each host's root is an overlay: the shared base image below, the host's own changes above,
//! in its directory under the state directory. The controller writes into a host's root only
//! while preparing it, before its first boot. After that the tree belongs to the guest, and a
//! path written from the controller could follow a symlink the guest made.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::cgroup;
use super::error::LabError;
use super::net;
use super::ssh;
use super::state::{HostRecord, LabPaths};
use super::system::{self, write_file_atomically};

/// Maximum time for a command run inside a host's root with chroot before its first boot.
const CHROOT_TIMEOUT: Duration = Duration::from_secs(30);

/// Files of one host under the state directory.
#[derive(Debug, Clone)]
pub(crate) struct HostDirs {
    pub dir: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Mount point of the overlay, which the container boots from.
    pub root: PathBuf,
    pub console_log: PathBuf,
}

impl HostDirs {
    pub fn new(paths: &LabPaths, host_name: &str) -> HostDirs {
        let dir = paths.host_dir(host_name);
        HostDirs {
            upper: dir.join("upper"),
            work: dir.join("work"),
            root: dir.join("root"),
            console_log: dir.join("console.log"),
            dir,
        }
    }
}

/// Mounts the host's overlay root when it is not mounted yet.
pub(crate) fn mount_root(
    dirs: &HostDirs,
    base_image: &Path,
    host_name: &str,
) -> Result<(), LabError> {
    for dir in [&dirs.upper, &dirs.work, &dirs.root] {
        fs::create_dir_all(dir).map_err(LabError::io("create", dir))?;
    }
    if system::is_mount_point(&dirs.root) {
        return Ok(());
    }
    system::mount_overlay(base_image, &dirs.upper, &dirs.work, &dirs.root).map_err(|source| {
        LabError::Mount {
            host: host_name.to_string(),
            path: dirs.root.clone(),
            source,
        }
    })
}

/// Writes what makes the mounted root a distinct machine: hostname, machine id, its own SSH
/// host key, the sshd port, and the inventory's SSH user with passwordless sudo and the lab
/// key. Returns the host's public key line.
pub(crate) fn prepare_root(
    dirs: &HostDirs,
    host: &HostRecord,
    lab_public_key: &str,
) -> Result<String, LabError> {
    let root = &dirs.root;

    write_root_file(root, "etc/hostname", &format!("{}\n", host.name), 0o644)?;
    let hosts = format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        host.name
    );
    write_root_file(root, "etc/hosts", &hosts, 0o644)?;
    write_root_file(
        root,
        "etc/machine-id",
        &format!("{}\n", random_machine_id()),
        0o444,
    )?;

    let host_key = root.join("etc/ssh/ssh_host_ed25519_key");
    for path in [host_key.clone(), ssh::public_key_path(&host_key)] {
        if path.exists() {
            fs::remove_file(&path).map_err(LabError::io("remove", &path))?;
        }
    }
    ssh::generate_key(&host_key, &format!("root@{}", host.name))?;
    let sshd_config = format!(
        "# Written by yametee-deploy lab for host {}.\nPort {}\nHostKey /etc/ssh/ssh_host_ed25519_key\n",
        host.name, host.ssh_port
    );
    write_root_file(
        root,
        "etc/ssh/sshd_config.d/yametee-lab.conf",
        &sshd_config,
        0o644,
    )?;

    let account = ensure_user(root, &host.ssh_user)?;
    if host.ssh_user != "root" {
        let sudoers = format!("{} ALL=(ALL:ALL) NOPASSWD: ALL\n", host.ssh_user);
        write_root_file(
            root,
            &format!("etc/sudoers.d/yametee-lab-{}", host.ssh_user),
            &sudoers,
            0o440,
        )?;
    }
    install_authorized_key(root, &account, lab_public_key)?;

    ssh::read_public_key(&ssh::public_key_path(&host_key))
}

/// Starts the host's container in the background and returns its systemd-nspawn process.
///
/// systemd-nspawn runs in a session of its own, with stdin from /dev/null and its console
/// output in the host's console log. `--console=read-only` gives the container a console
/// without needing a terminal. SIGTERM to the process makes the guest power off. The process
/// runs in the host's own cgroup.
pub(crate) fn boot(dirs: &HostDirs, host: &HostRecord) -> Result<Child, LabError> {
    let cgroups = cgroup::create_host_cgroups(&host.name)?;
    let log =
        fs::File::create(&dirs.console_log).map_err(LabError::io("create", &dirs.console_log))?;
    let log_err = log
        .try_clone()
        .map_err(LabError::io("open", &dirs.console_log))?;

    let mut command = Command::new("systemd-nspawn");
    command
        .arg("--boot")
        .arg("--register=no")
        .arg("--keep-unit")
        .arg(format!(
            "--network-namespace-path={}",
            net::netns_path(&host.netns).display()
        ))
        // ufw needs CAP_NET_ADMIN and writable network sysctls.
        .arg("--capability=all")
        .arg(format!("--directory={}", dirs.root.display()))
        .arg(format!("--machine={}", host.name))
        .arg("--console=read-only")
        .arg("--resolv-conf=off")
        .arg("--timezone=off")
        .arg("--link-journal=no")
        .arg("--setenv=SYSTEMD_COLORS=0")
        .env("SYSTEMD_COLORS", "0")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: the closure only makes async-signal-safe system calls (setsid, open, write,
    // close) and allocates nothing, as required between fork() and exec().
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            cgroups.join()
        });
    }

    let description = system::describe(&command);
    tracing::debug!(host = %host.name, command = %description, "booting");
    command.spawn().map_err(|source| LabError::Spawn {
        command: description,
        source,
    })
}

/// Tells whether the host's recorded systemd-nspawn process still runs. The start time and
/// the `--directory` argument make sure the pid is still the lab's own process.
pub(crate) fn is_running(dirs: &HostDirs, host: &HostRecord) -> bool {
    let (Some(pid), Some(start_time)) = (host.nspawn_pid, host.nspawn_start_time) else {
        return false;
    };
    if !system::is_process_running(pid, start_time) {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let expected = format!("--directory={}", dirs.root.display());
    cmdline
        .split(|byte| *byte == 0)
        .any(|arg| arg == expected.as_bytes())
}

/// Stops the given hosts' containers: SIGTERM to each systemd-nspawn (the guests power off),
/// SIGKILL to those still running after `grace`, then SIGKILL to every container process
/// still in a host's network namespace.
///
/// The last step matters because a killed systemd-nspawn leaves its container running.
pub(crate) fn stop(hosts: &[(HostDirs, HostRecord)], grace: Duration) {
    let running: Vec<&(HostDirs, HostRecord)> = hosts
        .iter()
        .filter(|(dirs, host)| is_running(dirs, host))
        .collect();
    for (_, host) in &running {
        eprintln!("lab: stopping {}", host.name);
        system::signal_process(host.nspawn_pid.unwrap_or_default(), libc::SIGTERM);
    }

    let all_stopped = || running.iter().all(|(dirs, host)| !is_running(dirs, host));
    if !system::wait_until(grace, all_stopped) {
        for (_, host) in running.iter().filter(|(dirs, host)| is_running(dirs, host)) {
            tracing::warn!(host = %host.name, "host did not power off in time; killing it");
            eprintln!(
                "lab: {} did not power off within {} s; killing it",
                host.name,
                grace.as_secs()
            );
            system::signal_process(host.nspawn_pid.unwrap_or_default(), libc::SIGKILL);
        }
        system::wait_until(Duration::from_secs(5), all_stopped);
    }

    for (_, host) in hosts {
        let left = kill_container_processes(&host.netns);
        if !left.is_empty() {
            tracing::warn!(host = %host.name, pids = ?left, "container processes still running after SIGKILL");
        }
        for dir in cgroup::remove_host_cgroups(&host.name) {
            tracing::warn!(host = %host.name, cgroup = %dir.display(), "failed to remove the host's cgroup");
        }
    }
}

/// Kills every container process in the network namespace `netns`, such as those of a
/// container whose systemd-nspawn was killed. Returns the pids still running after 5 s.
pub(crate) fn kill_container_processes(netns: &str) -> Vec<u32> {
    let path = net::netns_path(netns);
    system::stop_processes(
        || system::container_processes_in_netns(&path),
        Duration::ZERO,
    )
}

/// Account fields of a user, from the guest's /etc/passwd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Creates the user inside the root (with a home directory and a group of its own) unless
/// it exists, and returns its account fields.
fn ensure_user(root: &Path, user: &str) -> Result<Account, LabError> {
    let passwd_path = root.join("etc/passwd");
    let passwd = fs::read_to_string(&passwd_path).map_err(LabError::io("read", &passwd_path))?;
    if let Some(account) = find_account(&passwd, user) {
        return Ok(account);
    }

    let mut useradd = Command::new("chroot");
    useradd.arg(root).args([
        "useradd",
        "--create-home",
        "--user-group",
        "--shell",
        "/bin/bash",
        user,
    ]);
    system::run(&mut useradd, CHROOT_TIMEOUT)?;

    let passwd = fs::read_to_string(&passwd_path).map_err(LabError::io("read", &passwd_path))?;
    find_account(&passwd, user).ok_or_else(|| LabError::Io {
        action: "find the new user in",
        path: passwd_path,
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no entry for `{user}`"),
        ),
    })
}

/// Finds a user's entry in the text of a passwd file.
pub(crate) fn find_account(passwd: &str, user: &str) -> Option<Account> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[0] != user {
            return None;
        }
        Some(Account {
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5].to_string(),
        })
    })
}

/// Puts the lab's public key in the user's `~/.ssh/authorized_keys`, owned by the user.
fn install_authorized_key(
    root: &Path,
    account: &Account,
    lab_public_key: &str,
) -> Result<(), LabError> {
    let ssh_dir = root.join(account.home.trim_start_matches('/')).join(".ssh");
    fs::create_dir_all(&ssh_dir).map_err(LabError::io("create", &ssh_dir))?;
    fs::set_permissions(&ssh_dir, fs::Permissions::from_mode(0o700))
        .map_err(LabError::io("set the mode of", &ssh_dir))?;

    let authorized_keys = ssh_dir.join("authorized_keys");
    write_file_atomically(
        &authorized_keys,
        format!("{lab_public_key}\n").as_bytes(),
        0o600,
    )?;

    for path in [&ssh_dir, &authorized_keys] {
        std::os::unix::fs::chown(path, Some(account.uid), Some(account.gid))
            .map_err(LabError::io("change the owner of", path))?;
    }
    Ok(())
}

fn write_root_file(root: &Path, relative: &str, contents: &str, mode: u32) -> Result<(), LabError> {
    let path = root.join(relative);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(LabError::io("create", parent))?;
    }
    write_file_atomically(&path, contents.as_bytes(), mode)
}

fn random_machine_id() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
postgres:x:104:110:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash
deploy:x:1000:1000::/home/deploy:/bin/bash
";

    #[test]
    fn account_found_by_name() {
        assert_eq!(
            find_account(PASSWD, "deploy"),
            Some(Account {
                uid: 1000,
                gid: 1000,
                home: "/home/deploy".into()
            })
        );
        assert_eq!(find_account(PASSWD, "root").unwrap().home, "/root");
    }

    #[test]
    fn account_missing_or_prefix() {
        assert_eq!(find_account(PASSWD, "dep"), None);
        assert_eq!(find_account(PASSWD, "nobody"), None);
    }

    #[test]
    fn machine_id_is_32_hex() {
        let id = random_machine_id();
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
