//! Local replica of the inventory's hosts: one systemd-nspawn Debian host per inventory host,
//! each at the inventory's own address, bridged inside one isolated control network namespace.

use std::net::Ipv4Addr;

/// One host the lab boots, taken from the inventory.
#[derive(Debug, Clone)]
pub struct LabHost {
    pub name: String,
    pub address: Ipv4Addr,
    pub ssh_port: u16,
    pub ssh_user: String,
    pub roles: Vec<String>,
}

/// Everything `lab up` needs from the inventory.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub hosts: Vec<LabHost>,
    /// Names of the environment variables the inventory's secrets refer to (`{env: NAME}`).
    pub secret_env_names: Vec<String>,
}
