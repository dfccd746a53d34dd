//! Local replica of the inventory's hosts: one systemd-nspawn Debian host per inventory host,
//! each at the inventory's own address, bridged inside one isolated control network namespace.
//!
//! `up` builds (once) and caches a debootstrap base image, gives each host an overlay of it
//! and a network namespace, boots the containers and waits for their sshd. Commands run with
//! `--lab` call [`load_context`] and [`enter_control_namespace`], so their SSH connections can
//! reach the lab hosts and nothing else. Everything needs root.
//!
//! The lab uses fixed namespace names, so one machine runs one lab at a time.

use std::net::Ipv4Addr;

mod cgroup;
mod context;
mod error;
mod host;
mod image;
mod lifecycle;
mod net;
mod ssh;
mod state;
mod status;
mod system;

pub use context::{enter_control_namespace, load_context, ssh_command, LabContext, LabHostContext};
pub use error::LabError;
pub use lifecycle::{down, status, up};
pub use status::{HostStatus, LabStatus};

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
