//! The report of `lab status`: each host's address, whether its container runs and whether
//! its sshd accepts connections, as JSON or as a small table.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::Serialize;

/// State of the whole lab.
#[derive(Debug, Clone, Serialize)]
pub struct LabStatus {
    pub state_dir: PathBuf,
    /// Network namespace that `--lab` commands run in.
    pub control_netns: String,
    /// Whether the control namespace exists.
    pub network_up: bool,
    pub hosts: Vec<HostStatus>,
}

/// State of one lab host.
#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    pub name: String,
    pub address: Ipv4Addr,
    pub ssh_port: u16,
    pub ssh_user: String,
    pub roles: Vec<String>,
    /// Whether the host's systemd-nspawn process runs.
    pub running: bool,
    /// Process id of the host's systemd-nspawn process, when it runs.
    pub pid: Option<u32>,
    /// Whether the host's sshd sent its banner to a connection from the control namespace.
    pub ssh_reachable: bool,
}

impl LabStatus {
    /// Tells whether every host runs and accepts SSH connections (false for a lab with no host).
    pub fn is_ready(&self) -> bool {
        !self.hosts.is_empty()
            && self
                .hosts
                .iter()
                .all(|host| host.running && host.ssh_reachable)
    }
}

impl fmt::Display for LabStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hosts.is_empty() {
            return writeln!(
                f,
                "lab is not running (state in {})",
                self.state_dir.display()
            );
        }

        let yes_no = |value: bool| if value { "yes" } else { "no" };
        let name_width = self
            .hosts
            .iter()
            .map(|host| host.name.len())
            .max()
            .unwrap_or(0)
            .max("HOST".len());
        let roles_width = self
            .hosts
            .iter()
            .map(|host| host.roles.join(",").len())
            .max()
            .unwrap_or(0)
            .max("ROLES".len());

        writeln!(
            f,
            "{:name_width$}  {:15}  {:5}  {:roles_width$}  {:7}  SSH",
            "HOST", "ADDRESS", "PORT", "ROLES", "RUNNING"
        )?;
        for host in &self.hosts {
            writeln!(
                f,
                "{:name_width$}  {:15}  {:5}  {:roles_width$}  {:7}  {}",
                host.name,
                host.address.to_string(),
                host.ssh_port,
                host.roles.join(","),
                yes_no(host.running),
                if host.ssh_reachable {
                    "reachable"
                } else {
                    "unreachable"
                },
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(hosts: Vec<HostStatus>) -> LabStatus {
        LabStatus {
            state_dir: PathBuf::from("/var/lib/yametee-deploy/lab"),
            control_netns: "ytd-ctl".into(),
            network_up: true,
            hosts,
        }
    }

    fn host(name: &str, last: u8, running: bool) -> HostStatus {
        HostStatus {
            name: name.into(),
            address: Ipv4Addr::new(192, 168, 120, last),
            ssh_port: 22,
            ssh_user: "deploy".into(),
            roles: vec![name.into()],
            running,
            pid: running.then_some(100 + u32::from(last)),
            ssh_reachable: running,
        }
    }

    #[test]
    fn table_aligns_columns() {
        let table = status(vec![host("postgres", 42, true), host("web", 50, false)]).to_string();
        assert_eq!(
            table,
            "\
HOST      ADDRESS          PORT   ROLES     RUNNING  SSH
postgres  192.168.120.42      22  postgres  yes      reachable
web       192.168.120.50      22  web       no       unreachable
"
        );
    }

    #[test]
    fn table_empty_lab() {
        assert_eq!(
            status(vec![]).to_string(),
            "lab is not running (state in /var/lib/yametee-deploy/lab)\n"
        );
    }

    #[test]
    fn ready_needs_every_host() {
        assert!(status(vec![host("web", 50, true)]).is_ready());
        assert!(!status(vec![host("web", 50, true), host("redis", 44, false)]).is_ready());
        assert!(!status(vec![]).is_ready());
    }

    #[test]
    fn json_has_host_fields() {
        let json = serde_json::to_value(status(vec![host("web", 50, true)])).unwrap();
        assert_eq!(json["hosts"][0]["address"], "192.168.120.50");
        assert_eq!(json["hosts"][0]["running"], true);
        assert_eq!(json["hosts"][0]["ssh_reachable"], true);
    }
}
