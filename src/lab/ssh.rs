//! SSH between the controller and the lab hosts: the lab's own identity, the known_hosts file
//! that pins each host's key, the `ssh` argv, and a probe for a listening sshd.

use std::ffi::OsString;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::error::LabError;
use super::net;
use super::state::{HostRecord, LabPaths};
use super::system::{self, write_file_atomically};

/// Maximum time for one ssh-keygen run.
const KEYGEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Seconds ssh waits for the TCP connection, passed as `ConnectTimeout`.
const CONNECT_TIMEOUT_SECONDS: u32 = 10;

/// Returns the lab identity's public key line, generating an ed25519 key pair first when the
/// state directory has none.
pub(crate) fn ensure_lab_identity(paths: &LabPaths) -> Result<String, LabError> {
    let private_key = paths.identity_file();
    let public_key = public_key_path(&private_key);

    if !(private_key.is_file() && public_key.is_file()) {
        // A half-written pair from an interrupted run is replaced whole.
        for path in [&private_key, &public_key] {
            if path.exists() {
                std::fs::remove_file(path).map_err(LabError::io("remove", path))?;
            }
        }
        generate_key(&private_key, "yametee-deploy-lab")?;
    }

    read_public_key(&public_key)
}

/// Generates an ed25519 key pair without passphrase at `private_key` and `private_key.pub`.
pub(crate) fn generate_key(private_key: &Path, comment: &str) -> Result<(), LabError> {
    let mut command = Command::new("ssh-keygen");
    command
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(private_key);
    system::run(&mut command, KEYGEN_TIMEOUT).map(drop)
}

pub(crate) fn public_key_path(private_key: &Path) -> PathBuf {
    let mut name = private_key.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

pub(crate) fn read_public_key(path: &Path) -> Result<String, LabError> {
    let text = std::fs::read_to_string(path).map_err(LabError::io("read", path))?;
    Ok(text.trim().to_string())
}

/// Formats the known_hosts line that pins `public_key` (an OpenSSH public key line, whose
/// comment is dropped) at `address`. ssh looks a host up as `[address]:port` when the port
/// is not 22. Returns `None` when the key line has no type and key fields.
pub(crate) fn known_hosts_line(address: Ipv4Addr, port: u16, public_key: &str) -> Option<String> {
    let mut fields = public_key.split_whitespace();
    let (key_type, key) = (fields.next()?, fields.next()?);
    let pattern = if port == 22 {
        address.to_string()
    } else {
        format!("[{address}]:{port}")
    };
    Some(format!("{pattern} {key_type} {key}"))
}

/// Rewrites the lab's known_hosts file with one line per host whose key is known.
pub(crate) fn write_known_hosts(paths: &LabPaths, hosts: &[HostRecord]) -> Result<(), LabError> {
    let mut text = String::new();
    for host in hosts {
        let line = host
            .host_public_key
            .as_deref()
            .and_then(|key| known_hosts_line(host.address, host.ssh_port, key));
        if let Some(line) = line {
            text.push_str(&line);
            text.push('\n');
        }
    }
    write_file_atomically(&paths.known_hosts_file(), text.as_bytes(), 0o644)
}

/// Options and destination of an `ssh` run to a lab host, without the program name. The
/// options ignore every ssh configuration file, use only the lab identity and accept only
/// the host key pinned in the lab's known_hosts file.
pub(crate) fn ssh_args(
    identity: &Path,
    known_hosts: &Path,
    user: &str,
    address: Ipv4Addr,
    port: u16,
) -> Vec<OsString> {
    let option = |text: String| -> [OsString; 2] { ["-o".into(), text.into()] };
    let mut args: Vec<OsString> = vec!["-F".into(), "none".into(), "-i".into(), identity.into()];
    args.extend(option("IdentitiesOnly=yes".into()));
    // ssh splits option values on spaces unless they are quoted.
    args.extend(option(format!(
        "UserKnownHostsFile=\"{}\"",
        known_hosts.display()
    )));
    args.extend(option("GlobalKnownHostsFile=/dev/null".into()));
    args.extend(option("StrictHostKeyChecking=yes".into()));
    args.extend(option("BatchMode=yes".into()));
    args.extend(option(format!("ConnectTimeout={CONNECT_TIMEOUT_SECONDS}")));
    args.extend(["-p".into(), port.to_string().into()]);
    args.push(format!("{user}@{address}").into());
    args
}

/// Builds `ip netns exec NETNS ssh ...` to a lab host, usable from the controller's own
/// network namespace.
pub(crate) fn ssh_command_in_netns<I, S>(
    paths: &LabPaths,
    netns: &str,
    host: &HostRecord,
    extra_args: I,
) -> Command
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns, "ssh"]);
    command.args(ssh_args(
        &paths.identity_file(),
        &paths.known_hosts_file(),
        &host.ssh_user,
        host.address,
        host.ssh_port,
    ));
    command.args(extra_args.into_iter().map(Into::into));
    command
}

/// Tells, for each target, whether an SSH server there sends its version banner within
/// `timeout`. The probes run in parallel, each on a thread inside `netns`.
pub(crate) fn probe_ssh_banners(
    netns: &str,
    targets: &[SocketAddr],
    timeout: Duration,
) -> Vec<bool> {
    let path = net::netns_path(netns);
    let probes: Vec<_> = targets
        .iter()
        .map(|&target| {
            let path = path.clone();
            std::thread::spawn(move || {
                net::enter_network_namespace(&path).is_ok() && reads_ssh_banner(target, timeout)
            })
        })
        .collect();
    probes
        .into_iter()
        .map(|probe| probe.join().unwrap_or(false))
        .collect()
}

fn reads_ssh_banner(target: SocketAddr, timeout: Duration) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&target, timeout) else {
        return false;
    };
    if stream.set_read_timeout(Some(timeout)).is_err() {
        return false;
    }
    // The server sends "SSH-2.0-..." first; four bytes tell it apart from any other service.
    let mut start = [0u8; 4];
    stream.read_exact(&mut start).is_ok() && &start == b"SSH-"
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests root@web";

    #[test]
    fn known_hosts_default_port() {
        let line = known_hosts_line(Ipv4Addr::new(192, 168, 120, 50), 22, KEY).unwrap();
        assert_eq!(
            line,
            "192.168.120.50 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests"
        );
    }

    #[test]
    fn known_hosts_other_port_bracketed() {
        let line = known_hosts_line(Ipv4Addr::new(192, 168, 120, 45), 2222, KEY).unwrap();
        assert_eq!(
            line,
            "[192.168.120.45]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests"
        );
    }

    #[test]
    fn known_hosts_rejects_bare_type() {
        assert_eq!(
            known_hosts_line(Ipv4Addr::new(10, 0, 0, 1), 22, "ssh-ed25519"),
            None
        );
    }

    #[test]
    fn ssh_args_pin_lab_files() {
        let args = ssh_args(
            Path::new("/lab/id_ed25519"),
            Path::new("/lab/known_hosts"),
            "deploy",
            Ipv4Addr::new(192, 168, 120, 45),
            2222,
        );
        let args: Vec<String> = args
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");

        assert!(
            joined.starts_with("-F none -i /lab/id_ed25519 "),
            "{joined}"
        );
        assert!(
            joined.contains("-o UserKnownHostsFile=\"/lab/known_hosts\""),
            "{joined}"
        );
        assert!(joined.contains("-o StrictHostKeyChecking=yes"), "{joined}");
        assert!(
            joined.contains("-o GlobalKnownHostsFile=/dev/null"),
            "{joined}"
        );
        assert!(
            joined.ends_with("-p 2222 deploy@192.168.120.45"),
            "{joined}"
        );
    }

    #[test]
    fn public_key_path_appends_pub() {
        assert_eq!(
            public_key_path(Path::new("/lab/id_ed25519")),
            PathBuf::from("/lab/id_ed25519.pub")
        );
    }
}
