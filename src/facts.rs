//! Current state of a host: the content of its managed files, its packages, users, services,
//! firewall, worker release and pending restarts. Reading it changes nothing on the host.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::render::{worker_paths, DesiredHost};
use crate::ssh::{Remote, RemoteCommand, SshError};

/// File on each host where apply records restarts it still owes, so a run interrupted between
/// writing a file and restarting its service restarts it on the next apply.
pub const PENDING_RESTARTS_FILE: &str = "/var/lib/yametee-deploy/pending-restarts";

/// File in which apply records the firewall it left in sync: the checksum of ufw's own state files,
/// then the rules, one per line. While the checksum still matches, the next run reads the
/// rules from here instead of starting ufw, a Python program, twice.
pub const FIREWALL_RECORD_FILE: &str = "/var/lib/yametee-deploy/firewall";

/// Prints the checksum of ufw's state files: the rules ufw keeps, whether it is enabled and
/// its default policies. Any change made with ufw changes one of them.
pub const UFW_CHECKSUM_SCRIPT: &str = "cat /etc/ufw/user.rules /etc/ufw/user6.rules \
  /etc/ufw/ufw.conf /etc/default/ufw 2>/dev/null | sha256sum | cut -d' ' -f1";

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
    /// Whether this was read from the record of the last apply rather than from ufw.
    #[serde(skip)]
    pub from_record: bool,
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
    /// sha256 of the current release's binary (or `missing`), read only when the binary no
    /// longer matches the stamp apply left beside it.
    pub worker_release_sha256: Option<String>,
    pub pending_restarts: BTreeSet<String>,
    pub platform: Platform,
    /// Bytes free on the file system of /opt, where worker releases go.
    pub disk_available: Option<u64>,
}

/// Reads everything `plan` compares against `desired`, in one remote script: one session
/// instead of one per file, unit and setting, which is most of a no-op apply's time.
pub async fn gather(remote: &Remote, desired: &DesiredHost) -> Result<HostFacts, SshError> {
    let mut paths: BTreeSet<&str> = desired
        .files
        .iter()
        .map(|file| file.path.as_str())
        .collect();
    paths.extend(desired.last_lines.iter().map(|line| line.path.as_str()));
    paths.insert(PENDING_RESTARTS_FILE);
    let units: Vec<&str> = desired
        .services
        .iter()
        .map(|service| service.unit.as_str())
        .collect();

    let mut args: Vec<&str> = paths.iter().copied().collect();
    args.push("--");
    args.extend(desired.packages.iter().map(String::as_str));
    args.push("--");
    args.extend(desired.system_users.iter().map(String::as_str));
    args.push("--");
    args.extend(units.iter().copied());
    args.push("--");
    args.push(worker_paths::CURRENT_LINK);

    let script = GATHER_SCRIPT
        .replace("@RECORD@", FIREWALL_RECORD_FILE)
        .replace("@CHECKSUM@", UFW_CHECKSUM_SCRIPT)
        .replace("@BINARY@", worker_paths::BINARY_NAME)
        .replace("@STAMP@", worker_paths::STAMP_NAME);
    let command = RemoteCommand::script("read the host's state", &script, &args).as_root();
    let output = remote.run(&command).await?;
    let mut facts = parse_gathered(&output, desired).map_err(|problem| SshError::Failed {
        host: remote.host().to_string(),
        command: command.described(),
        labelled: true,
        status: "returned unreadable output".into(),
        stderr: problem,
    })?;
    if !desired.roles.contains(&crate::inventory::Role::Worker) {
        facts.worker_release = None;
        facts.worker_release_sha256 = None;
    }
    Ok(facts)
}

/// Prints one tab-separated record per fact. Arguments: the files to read, `--`, the packages,
/// `--`, the system users, `--`, the units, `--`, the worker's `current` link. File contents and
/// ufw's output are base64, so any byte survives.
const GATHER_SCRIPT: &str = r#"set -u
# ufw is a Python program that takes a good part of a second to start. While its state files
# match the record of the last apply and its chains are loaded, the record is read instead;
# otherwise its two reports run in the background while the rest is read.
scratch=$(mktemp -d)
trap 'rm -rf -- "$scratch"' EXIT
record=@RECORD@
if [ -r "$record" ] && [ "$(head -n 1 "$record")" = "$(@CHECKSUM@)" ] &&
  iptables -n -L ufw-user-input > /dev/null 2>&1; then
  recorded=1
else
  recorded=0
  ufw status verbose > "$scratch/status" 2>&1 &
  ufw show added > "$scratch/added" 2>&1 &
fi
while [ "$1" != -- ]; do
  if [ -e "$1" ]; then
    printf 'file\t%s\t%s\t' "$1" "$(stat -c '%a %U %G' -- "$1")"; base64 -w0 < "$1"; printf '\n'
  else
    printf 'file\t%s\tmissing\t\n' "$1"
  fi
  shift
done
shift
packages=
while [ "$1" != -- ]; do packages="$packages $1"; shift; done
shift
if [ -n "$packages" ]; then
  dpkg-query -W -f='${Package} ${db:Status-Status}\n' $packages 2>/dev/null |
    while read -r name status; do printf 'package\t%s\t%s\n' "$name" "$status"; done
fi
while [ "$1" != -- ]; do
  if getent passwd "$1" > /dev/null; then found=1; else found=0; fi
  printf 'user\t%s\t%s\n' "$1" "$found"
  shift
done
shift
while [ "$1" != -- ]; do
  # One systemctl call per unit; the values hold no spaces, so the shell splits them.
  enabled= active=
  for line in $(systemctl show --property=UnitFileState --property=ActiveState -- "$1" 2>/dev/null); do
    case $line in
      UnitFileState=*) enabled=${line#*=} ;;
      ActiveState=*) active=${line#*=} ;;
    esac
  done
  printf 'unit\t%s\t%s\t%s\n' "$1" "$enabled" "$active"
  shift
done
shift
wait
if [ "$recorded" = 1 ]; then
  printf 'ufw-recorded\t'; tail -n +2 "$record" | base64 -w0; printf '\n'
else
  printf 'ufw-status\t'; base64 -w0 < "$scratch/status"; printf '\n'
  printf 'ufw-added\t'; base64 -w0 < "$scratch/added"; printf '\n'
fi
printf 'machine\t%s\n' "$(uname -m)"
printf 'glibc\t%s\n' "$(getconf GNU_LIBC_VERSION 2>/dev/null)"
release=$(readlink -- "$1" 2>/dev/null)
printf 'release\t%s\n' "$release"
# apply stamps the binary's size, time and inode when it installs it. Only when that stamp no
# longer matches is the binary hashed, to catch a binary changed in place.
if [ -n "$release" ]; then
  binary="$release/@BINARY@"
  if [ ! -f "$binary" ]; then
    printf 'release-sha256\tmissing\n'
  elif [ "$(stat -c '%s %Y %i' -- "$binary")" != "$(cat -- "$release/@STAMP@" 2>/dev/null)" ]; then
    printf 'release-sha256\t%s\n' "$(sha256sum -- "$binary" | cut -d' ' -f1)"
  fi
fi
printf 'disk\t%s\n' "$(df -P -B1 /opt 2>/dev/null | awk 'NR == 2 { print $4 }')"
"#;

fn decode_base64(text: &str) -> Result<String, String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|error| format!("invalid base64: {error}"))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Turns the gather script's records into facts about the host.
fn parse_gathered(output: &str, desired: &DesiredHost) -> Result<HostFacts, String> {
    let mut facts = HostFacts::default();
    let mut installed: BTreeSet<String> = BTreeSet::new();
    let mut ufw_status = String::new();
    let mut ufw_added = String::new();
    let mut recorded_rules = None;

    for line in output.lines().filter(|line| !line.is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.as_slice() {
            ["file", path, "missing", _] => {
                facts.files.insert(path.to_string(), None);
            }
            ["file", path, meta, content] => {
                let header = format!("{meta}\n{}", decode_base64(content)?);
                let file = parse_file_listing(&header)
                    .ok_or_else(|| format!("cannot read the mode and owner of {path}: {meta}"))?;
                facts.files.insert(path.to_string(), Some(file));
            }
            ["package", name, status] => {
                if *status == "installed" {
                    installed.insert(name.to_string());
                }
            }
            ["user", name, found] => {
                if *found == "0" {
                    facts.missing_users.push(name.to_string());
                }
            }
            ["unit", name, enabled, active] => {
                let state = ServiceState {
                    enabled: *enabled == "enabled",
                    active: *active == "active",
                };
                facts.services.insert(name.to_string(), state);
            }
            ["ufw-status", text] => ufw_status = decode_base64(text)?,
            ["ufw-added", text] => ufw_added = decode_base64(text)?,
            ["ufw-recorded", text] => recorded_rules = Some(decode_base64(text)?),
            ["machine", machine] => facts.platform.machine = machine.to_string(),
            ["glibc", text] => {
                facts.platform.glibc = text.trim().strip_prefix("glibc ").map(String::from)
            }
            ["release-sha256", hash] => facts.worker_release_sha256 = Some(hash.to_string()),
            ["disk", available] => facts.disk_available = available.trim().parse().ok(),
            ["release", target] => {
                facts.worker_release = target
                    .rsplit('/')
                    .next()
                    .filter(|name| !name.is_empty())
                    .map(String::from)
            }
            _ => return Err(format!("unexpected line {line:?}")),
        }
    }

    facts.missing_packages = desired
        .packages
        .iter()
        .filter(|package| !installed.contains(*package))
        .cloned()
        .collect();
    facts.firewall = match recorded_rules {
        // A record is only written for a firewall that was active and denied incoming.
        Some(rules) => FirewallState {
            active: true,
            incoming_denied: true,
            rules: rules.lines().map(String::from).collect(),
            from_record: true,
        },
        None => parse_firewall(&ufw_status, &ufw_added),
    };
    if let Some(Some(pending)) = facts.files.remove(PENDING_RESTARTS_FILE) {
        facts.pending_restarts = pending
            .content
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(String::from)
            .collect();
    }
    Ok(facts)
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
        from_record: false,
    }
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
    fn gathered_records_become_facts() {
        use base64::Engine;
        let encode = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
        let desired = DesiredHost {
            name: "worker".into(),
            roles: vec![crate::inventory::Role::Worker],
            packages: vec!["redis-tools".into(), "ufw".into()],
            system_users: vec!["yametee-worker".into()],
            files: vec![],
            last_lines: vec![],
            services: vec![],
            firewall_rules: vec![],
        };
        let output = format!(
            "file\t/etc/a.env\t640 root yametee-worker\t{}\n\
             file\t/etc/missing\tmissing\t\n\
             file\t{PENDING_RESTARTS_FILE}\t644 root root\t{}\n\
             package\tufw\tinstalled\n\
             user\tyametee-worker\t0\n\
             unit\tyametee-worker.service\tenabled\tfailed\n\
             ufw-status\t{}\n\
             ufw-added\t{}\n\
             machine\tx86_64\n\
             glibc\tglibc 2.36\n\
             release\t/opt/yametee-worker/releases/0123456789abcdef\n",
            encode("A=1\n\tB=2\n"),
            encode("yametee-worker.service\n"),
            encode("Status: active\nDefault: deny (incoming), allow (outgoing)\n"),
            encode("Added user rules:\nufw allow 22/tcp\n"),
        );
        let facts = parse_gathered(&output, &desired).expect("parses");
        let file = facts.files["/etc/a.env"].as_ref().expect("file present");
        assert_eq!(file.content, "A=1\n\tB=2\n");
        assert_eq!(file.group, "yametee-worker");
        assert_eq!(facts.files["/etc/missing"], None);
        assert!(!facts.files.contains_key(PENDING_RESTARTS_FILE));
        assert!(facts.pending_restarts.contains("yametee-worker.service"));
        assert_eq!(facts.missing_packages, vec!["redis-tools"]);
        assert_eq!(facts.missing_users, vec!["yametee-worker"]);
        let unit = facts.services["yametee-worker.service"];
        assert!(unit.enabled);
        assert!(!unit.active);
        assert!(facts.firewall.active);
        assert_eq!(facts.firewall.rules, vec!["allow 22/tcp"]);
        assert_eq!(facts.platform.glibc.as_deref(), Some("2.36"));
        assert_eq!(facts.worker_release.as_deref(), Some("0123456789abcdef"));
        assert!(!facts.firewall.from_record);

        let recorded = format!(
            "ufw-recorded\t{}\n",
            encode("allow 22/tcp comment 'ssh'\nallow 80/tcp\n")
        );
        let facts = parse_gathered(&recorded, &desired).expect("parses");
        assert!(facts.firewall.from_record);
        assert!(facts.firewall.active);
        assert!(facts.firewall.incoming_denied);
        assert_eq!(
            facts.firewall.rules,
            vec!["allow 22/tcp comment 'ssh'", "allow 80/tcp"]
        );
    }

    #[test]
    fn gathered_garbage_is_an_error() {
        let desired = DesiredHost {
            name: "web".into(),
            roles: vec![],
            packages: vec![],
            system_users: vec![],
            files: vec![],
            last_lines: vec![],
            services: vec![],
            firewall_rules: vec![],
        };
        assert!(parse_gathered("sudo: something odd\n", &desired).is_err());
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
