//! The lab's network: one control namespace with a bridge, and one namespace per host whose
//! `eth0` carries the inventory's own address and is linked to that bridge by a veth pair.
//!
//! The control namespace has an address in each host subnet that no host uses and no default
//! route, so a process inside it can reach lab hosts and nothing else. It forwards between
//! subnets, and each host's default route points at it, so hosts of different subnets reach
//! each other. Every subnet is taken as a /24, because the inventory gives addresses without a
//! prefix length.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::error::LabError;
use super::system;
use super::LabHost;

/// Network namespace that `--lab` commands run in.
pub(crate) const CONTROL_NETNS: &str = "ytd-ctl";

/// Bridge in the control namespace that every host's veth is enslaved to.
const BRIDGE: &str = "ytd-br0";

/// Fixed MAC address of the bridge. Linux otherwise gives a bridge the lowest MAC address of
/// its ports, so the control address's MAC would change as hosts come and go.
const BRIDGE_MAC: &str = "02:00:00:00:00:01";

/// Name of the host's interface inside its own namespace, as on a typical VM.
pub(crate) const HOST_INTERFACE: &str = "eth0";

/// Prefix length assumed for every lab subnet.
const PREFIX_LENGTH: u8 = 24;

/// Linux limit on interface names (IFNAMSIZ minus the terminating NUL).
const MAX_INTERFACE_NAME: usize = 15;

/// Prefix of the control-side veth names.
const VETH_PREFIX: &str = "vh-";

/// Maximum time for one `ip` command.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Directory where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The decided network layout of a lab, computed from its hosts before anything is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NetworkPlan {
    /// Addresses of the control namespace, one per host subnet, in the order of first use.
    pub control_addresses: Vec<Ipv4Addr>,
    pub hosts: Vec<HostNetwork>,
}

/// Network settings of one lab host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostNetwork {
    pub name: String,
    pub address: Ipv4Addr,
    pub netns: String,
    pub control_veth: String,
    /// MAC address of the host's interface, derived from its IPv4 address.
    pub mac: String,
    /// The control namespace's address in the host's subnet, used as its default route.
    pub gateway: Ipv4Addr,
}

/// Validates the hosts' names and addresses and decides names and control addresses.
pub(crate) fn plan_network(hosts: &[LabHost]) -> Result<NetworkPlan, LabError> {
    let invalid = |reason: String| LabError::InvalidSpec { reason };

    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    let mut veths = HashSet::new();
    for host in hosts {
        validate_host_name(&host.name).map_err(invalid)?;
        validate_host_address(host).map_err(invalid)?;
        if !names.insert(host.name.as_str()) {
            return Err(invalid(format!("host name `{}` appears twice", host.name)));
        }
        if !addresses.insert(host.address) {
            return Err(invalid(format!(
                "address {} is given to more than one host",
                host.address
            )));
        }
        if !veths.insert(control_veth_name(&host.name)) {
            return Err(invalid(format!(
                "host `{}` gets the same interface name as another host; rename one of them",
                host.name
            )));
        }
    }

    let used: BTreeSet<Ipv4Addr> = addresses.into_iter().collect();
    let mut control_addresses: Vec<Ipv4Addr> = Vec::new();
    let mut plans = Vec::new();
    for host in hosts {
        let gateway = match control_addresses
            .iter()
            .find(|address| same_subnet(**address, host.address))
        {
            Some(address) => *address,
            None => {
                let address = pick_control_address(host.address, &used).ok_or_else(|| {
                    invalid(format!(
                        "subnet {}/{PREFIX_LENGTH} has no address left for the lab's control namespace",
                        subnet_of(host.address)
                    ))
                })?;
                control_addresses.push(address);
                address
            }
        };
        plans.push(HostNetwork {
            name: host.name.clone(),
            address: host.address,
            netns: host_netns_name(&host.name),
            control_veth: control_veth_name(&host.name),
            mac: host_mac_address(host.address),
            gateway,
        });
    }

    Ok(NetworkPlan {
        control_addresses,
        hosts: plans,
    })
}

/// Checks that a host name is a valid DNS label, because it becomes the container's hostname,
/// its machine name and part of file and namespace names.
fn validate_host_name(name: &str) -> Result<(), String> {
    let valid_characters = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if name.is_empty()
        || name.len() > 63
        || !valid_characters
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(format!(
            "host name `{name}` is not a valid hostname; use 1 to 63 letters, digits and inner hyphens"
        ));
    }
    Ok(())
}

fn validate_host_address(host: &LabHost) -> Result<(), String> {
    let address = host.address;
    let last = address.octets()[3];
    if address.is_loopback()
        || address.is_multicast()
        || address.is_unspecified()
        || address.is_broadcast()
        || last == 0
        || last == 255
    {
        return Err(format!(
            "host `{}` has address {address}, which cannot be a host's address in a /{PREFIX_LENGTH} subnet",
            host.name
        ));
    }
    Ok(())
}

/// Name of a host's network namespace. The `h-` part keeps it apart from the control one.
pub(crate) fn host_netns_name(host_name: &str) -> String {
    format!("ytd-h-{host_name}")
}

/// Name of a host's veth end in the control namespace: `vh-NAME` when that fits in 15
/// characters, else the name's first 7 characters and 4 hex digits of its hash.
pub(crate) fn control_veth_name(host_name: &str) -> String {
    let short = format!("{VETH_PREFIX}{host_name}");
    if short.len() <= MAX_INTERFACE_NAME {
        return short;
    }
    let hash = hex::encode(Sha256::digest(host_name.as_bytes()));
    let head: String = host_name.chars().take(7).collect();
    format!("{VETH_PREFIX}{head}-{}", &hash[..4])
}

/// MAC address for the host with this IPv4 address: locally administered (`02:00:`) followed
/// by the address's four bytes. A host created again at the same address gets the same MAC
/// address, so no neighbour cache in the lab keeps pointing at a deleted interface.
pub(crate) fn host_mac_address(address: Ipv4Addr) -> String {
    let [a, b, c, d] = address.octets();
    format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

fn subnet_of(address: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = address.octets();
    Ipv4Addr::new(a, b, c, 0)
}

fn same_subnet(left: Ipv4Addr, right: Ipv4Addr) -> bool {
    subnet_of(left) == subnet_of(right)
}

/// Picks the highest address of the host's /24 subnet that no host uses, from .254 down.
fn pick_control_address(host_address: Ipv4Addr, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let [a, b, c, _] = host_address.octets();
    (1..=254u8)
        .rev()
        .map(|last| Ipv4Addr::new(a, b, c, last))
        .find(|candidate| !used.contains(candidate))
}

pub(crate) fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
}

pub(crate) fn netns_exists(netns: &str) -> bool {
    netns_path(netns).exists()
}

/// Creates the control namespace and its bridge when missing, sets its addresses to exactly
/// the planned ones, and turns on forwarding between the host subnets.
pub(crate) fn ensure_control_network(plan: &NetworkPlan) -> Result<(), LabError> {
    ensure_netns(CONTROL_NETNS)?;

    if !link_exists(CONTROL_NETNS, BRIDGE)? {
        let add_bridge = [
            "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge",
        ];
        ip_in(CONTROL_NETNS, &add_bridge)?;
    }
    ip_in(CONTROL_NETNS, &["link", "set", BRIDGE, "up"])?;

    let current = bridge_addresses()?;
    for address in &current {
        if !plan.control_addresses.contains(address) {
            let prefix = format!("{address}/{PREFIX_LENGTH}");
            ip_in(CONTROL_NETNS, &["addr", "del", &prefix, "dev", BRIDGE])?;
        }
    }
    for address in &plan.control_addresses {
        if !current.contains(address) {
            let prefix = format!("{address}/{PREFIX_LENGTH}");
            ip_in(CONTROL_NETNS, &["addr", "add", &prefix, "dev", BRIDGE])?;
        }
    }

    let forwarding = "/proc/sys/net/ipv4/ip_forward";
    in_network_namespace(CONTROL_NETNS, move || std::fs::write(forwarding, "1\n"))?
        .map_err(LabError::io("write (in the control namespace)", forwarding))
}

/// Creates a host's namespace and veth pair when missing, and sets its address and route.
pub(crate) fn ensure_host_network(host: &HostNetwork) -> Result<(), LabError> {
    ensure_netns(&host.netns)?;

    if !link_exists(CONTROL_NETNS, &host.control_veth)? {
        // A veth pair dies with either end, so a missing control end means no host end either.
        let add_pair = [
            "link",
            "add",
            &host.control_veth,
            "type",
            "veth",
            "peer",
            "name",
            HOST_INTERFACE,
            "address",
            &host.mac,
            "netns",
            &host.netns,
        ];
        ip_in(CONTROL_NETNS, &add_pair)?;
    }
    ip_in(
        CONTROL_NETNS,
        &["link", "set", &host.control_veth, "master", BRIDGE],
    )?;
    ip_in(CONTROL_NETNS, &["link", "set", &host.control_veth, "up"])?;

    let address = format!("{}/{PREFIX_LENGTH}", host.address);
    let gateway = host.gateway.to_string();
    ip_in(
        &host.netns,
        &["addr", "replace", &address, "dev", HOST_INTERFACE],
    )?;
    ip_in(&host.netns, &["link", "set", HOST_INTERFACE, "up"])?;
    ip_in(
        &host.netns,
        &[
            "route",
            "replace",
            "default",
            "via",
            &gateway,
            "dev",
            HOST_INTERFACE,
        ],
    )
}

/// Deletes a named network namespace, which also deletes the interfaces in it and their veth
/// peers. Deleting a namespace that does not exist succeeds.
pub(crate) fn delete_netns(netns: &str) -> Result<(), LabError> {
    if !netns_exists(netns) {
        return Ok(());
    }
    ip(&["netns", "delete", netns])
}

fn ensure_netns(netns: &str) -> Result<(), LabError> {
    if !netns_exists(netns) {
        ip(&["netns", "add", netns])?;
    }
    ip_in(netns, &["link", "set", "lo", "up"])
}

fn link_exists(netns: &str, link: &str) -> Result<bool, LabError> {
    let mut command = Command::new("ip");
    command.args(["-n", netns, "link", "show", "dev", link]);
    let output = system::run_unchecked(&mut command, IP_TIMEOUT)?;
    Ok(output.status.success())
}

/// An entry of `ip -json addr show`; only the fields the lab reads.
#[derive(Deserialize)]
struct LinkAddresses {
    addr_info: Vec<AddressInfo>,
}

#[derive(Deserialize)]
struct AddressInfo {
    family: String,
    local: String,
}

fn bridge_addresses() -> Result<Vec<Ipv4Addr>, LabError> {
    let mut command = Command::new("ip");
    command.args(["-json", "-n", CONTROL_NETNS, "addr", "show", "dev", BRIDGE]);
    let stdout = system::run(&mut command, IP_TIMEOUT)?;
    Ok(parse_ipv4_addresses(&stdout))
}

/// Extracts the IPv4 addresses from the output of `ip -json addr show`.
fn parse_ipv4_addresses(json: &str) -> Vec<Ipv4Addr> {
    let links: Vec<LinkAddresses> = serde_json::from_str(json).unwrap_or_default();
    links
        .iter()
        .flat_map(|link| &link.addr_info)
        .filter(|info| info.family == "inet")
        .filter_map(|info| info.local.parse().ok())
        .collect()
}

/// Runs `ip -n NETNS ARGS...`.
fn ip_in(netns: &str, args: &[&str]) -> Result<(), LabError> {
    let mut command = Command::new("ip");
    command.args(["-n", netns]).args(args);
    system::run(&mut command, IP_TIMEOUT).map(drop)
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    let mut command = Command::new("ip");
    command.args(args);
    system::run(&mut command, IP_TIMEOUT).map(drop)
}

/// Runs `work` on a new thread that has entered the network namespace `netns`, and returns
/// its result. Sockets the thread opens live in that namespace; the calling thread and the
/// rest of the process stay where they are.
pub(crate) fn in_network_namespace<T, F>(netns: &str, work: F) -> Result<T, LabError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = netns_path(netns);
    let thread_path = path.clone();
    let handle = std::thread::spawn(move || -> Result<T, std::io::Error> {
        enter_network_namespace(&thread_path)?;
        Ok(work())
    });
    match handle.join() {
        Ok(result) => result.map_err(|source| LabError::EnterNamespace { path, source }),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Moves the calling thread into the network namespace at `path` with setns(2).
pub(crate) fn enter_network_namespace(path: &Path) -> std::io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: the descriptor is valid while `file` is open; setns only changes this thread's
    // network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, address: [u8; 4]) -> LabHost {
        LabHost {
            name: name.into(),
            address: Ipv4Addr::from(address),
            ssh_port: 22,
            ssh_user: "deploy".into(),
            roles: vec![],
        }
    }

    fn inventory_hosts() -> Vec<LabHost> {
        vec![
            host("web", [192, 168, 120, 50]),
            host("postgres", [192, 168, 120, 42]),
            host("redis", [192, 168, 120, 44]),
            host("worker", [192, 168, 120, 45]),
        ]
    }

    #[test]
    fn plan_one_subnet_one_control_address() {
        let plan = plan_network(&inventory_hosts()).unwrap();
        assert_eq!(
            plan.control_addresses,
            vec![Ipv4Addr::new(192, 168, 120, 254)]
        );
        assert!(plan
            .hosts
            .iter()
            .all(|host| host.gateway == Ipv4Addr::new(192, 168, 120, 254)));
        assert_eq!(plan.hosts[3].netns, "ytd-h-worker");
        assert_eq!(plan.hosts[3].control_veth, "vh-worker");
    }

    #[test]
    fn plan_control_address_avoids_hosts() {
        let hosts = vec![
            host("a", [10, 0, 0, 254]),
            host("b", [10, 0, 0, 253]),
            host("c", [10, 0, 0, 1]),
        ];
        let plan = plan_network(&hosts).unwrap();
        assert_eq!(plan.control_addresses, vec![Ipv4Addr::new(10, 0, 0, 252)]);
    }

    #[test]
    fn plan_one_control_address_per_subnet() {
        let hosts = vec![
            host("a", [10, 0, 1, 5]),
            host("b", [10, 0, 2, 5]),
            host("c", [10, 0, 1, 6]),
        ];
        let plan = plan_network(&hosts).unwrap();
        assert_eq!(
            plan.control_addresses,
            vec![Ipv4Addr::new(10, 0, 1, 254), Ipv4Addr::new(10, 0, 2, 254)]
        );
        assert_eq!(plan.hosts[1].gateway, Ipv4Addr::new(10, 0, 2, 254));
        assert_eq!(plan.hosts[2].gateway, Ipv4Addr::new(10, 0, 1, 254));
    }

    #[test]
    fn plan_full_subnet_rejected() {
        let hosts: Vec<LabHost> = (1..=254u8)
            .map(|last| host(&format!("h{last}"), [10, 9, 9, last]))
            .collect();
        let error = plan_network(&hosts).unwrap_err().to_string();
        assert!(error.contains("10.9.9.0/24 has no address left"), "{error}");
    }

    #[test]
    fn plan_rejects_duplicates() {
        let same_address = vec![host("a", [10, 0, 0, 5]), host("b", [10, 0, 0, 5])];
        let error = plan_network(&same_address).unwrap_err().to_string();
        assert!(
            error.contains("10.0.0.5 is given to more than one host"),
            "{error}"
        );

        let same_name = vec![host("a", [10, 0, 0, 5]), host("a", [10, 0, 0, 6])];
        let error = plan_network(&same_name).unwrap_err().to_string();
        assert!(error.contains("`a` appears twice"), "{error}");
    }

    #[test]
    fn plan_rejects_bad_names_and_addresses() {
        for name in ["", "-web", "web_1", "web.example", &"x".repeat(64)] {
            assert!(
                plan_network(&[host(name, [10, 0, 0, 5])]).is_err(),
                "name {name:?} accepted"
            );
        }
        for address in [
            [10, 0, 0, 0],
            [10, 0, 0, 255],
            [127, 0, 0, 5],
            [224, 0, 0, 5],
        ] {
            assert!(
                plan_network(&[host("web", address)]).is_err(),
                "address {address:?} accepted"
            );
        }
    }

    #[test]
    fn veth_names_fit_interface_limit() {
        assert_eq!(control_veth_name("web"), "vh-web");
        assert_eq!(control_veth_name("worker-12345"), "vh-worker-12345");

        let long = control_veth_name("worker-number-twelve");
        assert_eq!(long.len(), MAX_INTERFACE_NAME);
        assert!(long.starts_with("vh-worker-"), "{long}");
        assert_ne!(long, control_veth_name("worker-number-thirteen"));
    }

    #[test]
    fn mac_address_from_ipv4() {
        assert_eq!(
            host_mac_address(Ipv4Addr::new(192, 168, 120, 45)),
            "02:00:c0:a8:78:2d"
        );
        assert_eq!(
            host_mac_address(Ipv4Addr::new(10, 0, 0, 1)),
            "02:00:0a:00:00:01"
        );
    }

    #[test]
    fn ip_json_addresses_parsed() {
        let json = r#"[{"ifindex":3,"ifname":"ytd-br0","addr_info":[
            {"family":"inet","local":"192.168.120.254","prefixlen":24},
            {"family":"inet6","local":"fe80::1","prefixlen":64}]}]"#;
        assert_eq!(
            parse_ipv4_addresses(json),
            vec![Ipv4Addr::new(192, 168, 120, 254)]
        );
        assert_eq!(parse_ipv4_addresses(""), Vec::<Ipv4Addr>::new());
    }
}
