//! The plan: the steps that bring one host from its current state ([`HostFacts`]) to its
//! desired state ([`DesiredHost`]). Computing a plan changes nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::facts::{HostFacts, RemoteFile};
use crate::render::{worker_paths, DesiredHost, EnsuredLastLine, RenderedFile, Trigger};
use crate::secrets::Secrets;

/// The worker binary apply installs, with what a host needs to run it.
#[derive(Debug, Clone)]
pub struct WorkerBinary {
    pub path: PathBuf,
    pub sha256: String,
    /// Release directory name: the first 16 hex digits of the hash.
    pub release: String,
    /// `uname -m` name of the CPU architecture the binary is built for.
    pub machine: String,
    /// Highest glibc symbol version the binary needs, such as (2, 34).
    pub min_glibc: Option<(u32, u32)>,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("cannot read the worker binary {}; build it with `cargo build --release --workspace` \
             or name it with --worker-binary", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not an ELF executable for a supported architecture", path.display())]
    NotElf { path: PathBuf },
}

impl WorkerBinary {
    pub fn load(path: &Path) -> Result<WorkerBinary, BinaryError> {
        let bytes = std::fs::read(path).map_err(|source| BinaryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let not_elf = || BinaryError::NotElf {
            path: path.to_path_buf(),
        };
        let machine = elf_machine(&bytes).ok_or_else(not_elf)?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Ok(WorkerBinary {
            path: path.to_path_buf(),
            release: sha256[..16].to_string(),
            sha256,
            machine: machine.to_string(),
            min_glibc: max_glibc_version(&bytes),
            size: bytes.len() as u64,
        })
    }

    /// Bytes a release upload needs free: the binary and its temporary copy, plus a margin.
    pub fn space_needed(&self) -> u64 {
        2 * self.size + 64 * 1024 * 1024
    }

    /// Why `platform` cannot run this binary, if it cannot.
    pub fn incompatibility(&self, platform: &crate::facts::Platform) -> Option<String> {
        if platform.machine != self.machine {
            return Some(format!(
                "the worker binary is built for {} but the host is {}",
                self.machine, platform.machine
            ));
        }
        let (major, minor) = self.min_glibc?;
        let Some(host_glibc) = platform.glibc.as_deref() else {
            return Some(format!(
                "the worker binary needs glibc {major}.{minor} but the host has no glibc"
            ));
        };
        match parse_version(host_glibc) {
            Some(have) if have >= (major, minor) => None,
            _ => Some(format!(
                "the worker binary needs glibc {major}.{minor} but the host has glibc {host_glibc}"
            )),
        }
    }
}

fn elf_machine(bytes: &[u8]) -> Option<&'static str> {
    use object::elf;
    use object::read::elf::FileHeader;
    let header = elf::FileHeader64::<object::Endianness>::parse(bytes).ok()?;
    let endian = header.endian().ok()?;
    match header.e_machine(endian) {
        elf::EM_X86_64 => Some("x86_64"),
        elf::EM_AARCH64 => Some("aarch64"),
        elf::EM_RISCV => Some("riscv64"),
        _ => None,
    }
}

/// The highest `GLIBC_x.y` version the binary's dynamic string table names: the glibc
/// version it needs at least.
fn max_glibc_version(bytes: &[u8]) -> Option<(u32, u32)> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(bytes).ok()?;
    let dynstr = file.section_by_name(".dynstr")?.data().ok()?;
    dynstr
        .split(|byte| *byte == 0)
        .filter_map(|name| std::str::from_utf8(name).ok())
        .filter_map(|name| name.strip_prefix("GLIBC_"))
        .filter_map(parse_version)
        .max()
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().unwrap_or("0").parse().ok()?;
    Some((major, minor))
}

/// One step of a host's plan.
#[derive(Debug, Clone)]
pub enum Step {
    InstallPackages(Vec<String>),
    CreateSystemUser(String),
    WriteFile {
        file: RenderedFile,
        previous: Option<RemoteFile>,
    },
    EnsureLastLine(EnsuredLastLine),
    InstallRelease {
        release: String,
        previous: Option<String>,
    },
    DaemonReload,
    AddFirewallRule(String),
    DenyIncomingByDefault,
    EnableFirewall,
    DeleteFirewallRule(String),
    EnableService(String),
    Restart(String),
    Reload(String),
    Start(String),
}

/// A change as shown to people and pipelines.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Change {
    pub kind: &'static str,
    pub target: String,
    pub action: String,
}

impl Step {
    pub fn change(&self) -> Change {
        let (kind, target, action) = match self {
            Step::InstallPackages(packages) => {
                ("package", packages.join(" "), "install".to_string())
            }
            Step::CreateSystemUser(user) => ("user", user.clone(), "create".into()),
            Step::WriteFile { file, previous } => {
                let action = match previous {
                    None => "create".to_string(),
                    Some(previous) if previous.content == file.content => {
                        format!("set mode {:04o} {}:{}", file.mode, file.owner, file.group)
                    }
                    Some(_) => "update".into(),
                };
                ("file", file.path.clone(), action)
            }
            Step::EnsureLastLine(line) => (
                "file",
                format!("{} (last line `{}`)", line.path, line.line),
                "update".into(),
            ),
            Step::InstallRelease { release, .. } => (
                "release",
                format!("{}/{release}", worker_paths::RELEASES_DIR),
                "install".into(),
            ),
            Step::DaemonReload => ("systemd", "unit files".into(), "reload".into()),
            Step::AddFirewallRule(rule) => ("firewall", rule.clone(), "add".into()),
            Step::DenyIncomingByDefault => ("firewall", "default incoming".into(), "deny".into()),
            Step::EnableFirewall => ("firewall", "ufw".into(), "enable".into()),
            Step::DeleteFirewallRule(rule) => ("firewall", rule.clone(), "delete".into()),
            Step::EnableService(unit) => ("service", unit.clone(), "enable".into()),
            Step::Restart(unit) => ("service", unit.clone(), "restart".into()),
            Step::Reload(unit) => ("service", unit.clone(), "reload".into()),
            Step::Start(unit) => ("service", unit.clone(), "start".into()),
        };
        Change {
            kind,
            target,
            action,
        }
    }
}

/// Everything apply would do on one host.
#[derive(Debug, Clone)]
pub struct HostPlan {
    pub host: String,
    pub steps: Vec<Step>,
    /// What the PostgreSQL role and database check expects apply to change; empty when they
    /// are in place or the host is not the postgres host.
    pub database_changes: Vec<Change>,
    /// The rules to record on the host once its firewall is in sync, when the record is
    /// missing or out of date; see [`crate::facts::FIREWALL_RECORD_FILE`].
    pub firewall_record: Option<Vec<String>>,
}

impl HostPlan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.database_changes.is_empty()
    }

    pub fn changes(&self) -> Vec<Change> {
        let steps = self.steps.iter().map(Step::change);
        steps.chain(self.database_changes.iter().cloned()).collect()
    }

    /// Unified diffs of the files this plan writes, with secrets redacted.
    pub fn diffs(&self, secrets: &Secrets) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|step| match step {
                Step::WriteFile { file, previous } => {
                    Some(file_diff(file, previous.as_ref(), secrets))
                }
                _ => None,
            })
            .collect()
    }
}

fn file_diff(file: &RenderedFile, previous: Option<&RemoteFile>, secrets: &Secrets) -> String {
    let redact = |text: &str| crate::secrets::mask_secret_like(&secrets.redact(text));
    let old = previous
        .map(|previous| redact(&previous.content))
        .unwrap_or_default();
    let new = redact(&file.content);
    // Each header names its side: the host's file now, or the file apply would write.
    let old_name = if previous.is_some() {
        format!("{} (on the host)", file.path)
    } else {
        "/dev/null".into()
    };
    let new_name = format!("{} (rendered)", file.path);
    let mut text = similar::TextDiff::from_lines(&old, &new)
        .unified_diff()
        .context_radius(3)
        .header(&old_name, &new_name)
        .to_string();
    if text.is_empty() {
        text = match previous {
            Some(previous) if previous.content != file.content => {
                format!("{}: a secret value changed (not shown)\n", file.path)
            }
            Some(previous) => format!(
                "{}: mode {:04o} {}:{} -> {:04o} {}:{}\n",
                file.path,
                previous.mode,
                previous.owner,
                previous.group,
                file.mode,
                file.owner,
                file.group
            ),
            None => format!("{}: new empty file\n", file.path),
        };
    }
    text
}

/// Computes the steps that take a host from `facts` to `desired`.
pub fn plan_host(
    desired: &DesiredHost,
    facts: &HostFacts,
    worker: Option<&WorkerBinary>,
) -> HostPlan {
    let mut steps = Vec::new();
    let mut restarts: BTreeSet<String> = facts.pending_restarts.clone();
    let mut reloads: BTreeSet<String> = BTreeSet::new();
    let mut daemon_reload = false;
    let mut collect =
        |triggers: &[Trigger], restarts: &mut BTreeSet<String>, daemon_reload: &mut bool| {
            for trigger in triggers {
                match trigger {
                    Trigger::Restart(unit) => {
                        restarts.insert(unit.clone());
                    }
                    Trigger::Reload(unit) => {
                        reloads.insert(unit.clone());
                    }
                    Trigger::DaemonReload => *daemon_reload = true,
                    Trigger::SyncFirewall => {}
                }
            }
        };

    if !facts.missing_packages.is_empty() {
        steps.push(Step::InstallPackages(facts.missing_packages.clone()));
    }
    for user in &facts.missing_users {
        steps.push(Step::CreateSystemUser(user.clone()));
    }

    for file in &desired.files {
        let previous = facts.files.get(&file.path).cloned().flatten();
        let in_sync = previous.as_ref().is_some_and(|current| {
            current.content == file.content
                && current.mode == file.mode
                && current.owner == file.owner
                && current.group == file.group
        });
        if in_sync {
            continue;
        }
        let content_changed = previous
            .as_ref()
            .is_none_or(|current| current.content != file.content);
        if content_changed {
            collect(&file.triggers, &mut restarts, &mut daemon_reload);
        }
        steps.push(Step::WriteFile {
            file: file.clone(),
            previous,
        });
    }

    for line in &desired.last_lines {
        let current = facts.files.get(&line.path).cloned().flatten();
        let ends_with_line = current.as_ref().is_some_and(|file| {
            file.content
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::trim)
                == Some(line.line.as_str())
        });
        if !ends_with_line {
            collect(&line.triggers, &mut restarts, &mut daemon_reload);
            steps.push(Step::EnsureLastLine(line.clone()));
        }
    }

    if let Some(worker) = worker {
        // The release directory is named by the binary's hash; a binary changed in place
        // after install no longer starts with that name.
        let changed_in_place = facts
            .worker_release_sha256
            .as_ref()
            .is_some_and(|hash| !hash.starts_with(&worker.release));
        if facts.worker_release.as_deref() != Some(worker.release.as_str()) || changed_in_place {
            restarts.insert(worker_paths::UNIT.into());
            steps.push(Step::InstallRelease {
                release: worker.release.clone(),
                previous: facts.worker_release.clone(),
            });
        }
    }

    if daemon_reload {
        steps.push(Step::DaemonReload);
    }

    plan_firewall(desired, facts, &mut steps);

    for service in &desired.services {
        let state = facts
            .services
            .get(&service.unit)
            .copied()
            .unwrap_or_default();
        if !state.enabled {
            steps.push(Step::EnableService(service.unit.clone()));
        }
    }
    for service in &desired.services {
        let state = facts
            .services
            .get(&service.unit)
            .copied()
            .unwrap_or_default();
        if restarts.contains(&service.unit) {
            steps.push(Step::Restart(service.unit.clone()));
        } else if !state.active {
            steps.push(Step::Start(service.unit.clone()));
        } else if reloads.contains(&service.unit) {
            steps.push(Step::Reload(service.unit.clone()));
        }
    }
    // A pending restart of a unit this host no longer manages is dropped with the pending file.

    let firewall_changes = steps.iter().any(|step| step.change().kind == "firewall");
    let firewall_record =
        (firewall_changes || !facts.firewall.from_record).then(|| desired.firewall_rules.clone());
    HostPlan {
        host: desired.name.clone(),
        steps,
        database_changes: Vec::new(),
        firewall_record,
    }
}

fn plan_firewall(desired: &DesiredHost, facts: &HostFacts, steps: &mut Vec<Step>) {
    let current = &facts.firewall;
    for rule in &desired.firewall_rules {
        if !current.rules.contains(rule) {
            steps.push(Step::AddFirewallRule(rule.clone()));
        }
    }
    if !current.incoming_denied {
        steps.push(Step::DenyIncomingByDefault);
    }
    if !current.active {
        steps.push(Step::EnableFirewall);
    }
    for rule in &current.rules {
        if !desired.firewall_rules.contains(rule) {
            steps.push(Step::DeleteFirewallRule(rule.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::{FirewallState, ServiceState};
    use crate::render::Service;

    fn desired() -> DesiredHost {
        DesiredHost {
            name: "redis".into(),
            roles: vec![crate::inventory::Role::Redis],
            packages: vec!["redis-server".into()],
            system_users: vec![],
            files: vec![RenderedFile {
                path: "/etc/redis/yametee.conf".into(),
                content: "bind 10.0.0.1\n".into(),
                mode: 0o640,
                owner: "redis".into(),
                group: "redis".into(),
                triggers: vec![Trigger::Restart("redis-server.service".into())],
            }],
            last_lines: vec![],
            services: vec![Service {
                unit: "redis-server.service".into(),
            }],
            firewall_rules: vec!["allow 22/tcp comment 'ssh'".into()],
        }
    }

    fn converged_facts() -> HostFacts {
        let mut facts = HostFacts::default();
        facts.files.insert(
            "/etc/redis/yametee.conf".into(),
            Some(RemoteFile {
                mode: 0o640,
                owner: "redis".into(),
                group: "redis".into(),
                content: "bind 10.0.0.1\n".into(),
            }),
        );
        facts.services.insert(
            "redis-server.service".into(),
            ServiceState {
                enabled: true,
                active: true,
            },
        );
        facts.firewall = FirewallState {
            active: true,
            incoming_denied: true,
            rules: vec!["allow 22/tcp comment 'ssh'".into()],
            from_record: true,
        };
        facts
    }

    /// Returns the Redis drop-in as the host has it in `facts`, to change it in a test.
    fn redis_conf(facts: &mut HostFacts) -> &mut RemoteFile {
        facts
            .files
            .get_mut("/etc/redis/yametee.conf")
            .and_then(Option::as_mut)
            .expect("the converged facts hold the Redis drop-in")
    }

    /// Returns a worker binary for x86_64 whose sha256 starts with `release`.
    fn test_binary(release: &str, min_glibc: Option<(u32, u32)>) -> WorkerBinary {
        WorkerBinary {
            path: "w".into(),
            sha256: format!("{release}{}", "0".repeat(64 - release.len())),
            release: release.into(),
            machine: "x86_64".into(),
            min_glibc,
            size: 8 << 20,
        }
    }

    fn actions(plan: &HostPlan) -> Vec<String> {
        plan.changes()
            .into_iter()
            .map(|c| format!("{} {} {}", c.kind, c.target, c.action))
            .collect()
    }

    #[test]
    fn converged_host_has_empty_plan() {
        let plan = plan_host(&desired(), &converged_facts(), None);
        assert!(plan.is_empty(), "{:?}", actions(&plan));
    }

    #[test]
    fn changed_file_restarts_its_service() {
        let mut facts = converged_facts();
        redis_conf(&mut facts).content = "bind 127.0.0.1\n".into();
        let plan = plan_host(&desired(), &facts, None);
        assert_eq!(
            actions(&plan),
            vec![
                "file /etc/redis/yametee.conf update",
                "service redis-server.service restart",
            ]
        );
    }

    #[test]
    fn mode_change_rewrites_without_restart() {
        let mut facts = converged_facts();
        redis_conf(&mut facts).mode = 0o644;
        let plan = plan_host(&desired(), &facts, None);
        assert_eq!(
            actions(&plan),
            vec!["file /etc/redis/yametee.conf set mode 0640 redis:redis"]
        );
    }

    #[test]
    fn pending_restart_survives_interruption() {
        let mut facts = converged_facts();
        facts.pending_restarts.insert("redis-server.service".into());
        let plan = plan_host(&desired(), &facts, None);
        assert_eq!(actions(&plan), vec!["service redis-server.service restart"]);
    }

    #[test]
    fn firewall_record_written_when_stale() {
        let mut facts = converged_facts();
        assert_eq!(plan_host(&desired(), &facts, None).firewall_record, None);

        facts.firewall.from_record = false;
        let rules = desired().firewall_rules;
        let plan = plan_host(&desired(), &facts, None);
        assert!(plan.steps.is_empty());
        assert_eq!(plan.firewall_record.as_ref(), Some(&rules));

        facts.firewall.from_record = true;
        facts.firewall.rules.clear();
        let plan = plan_host(&desired(), &facts, None);
        assert_eq!(plan.firewall_record, Some(rules));
    }

    #[test]
    fn firewall_adds_before_enable_and_deletes_extras() {
        let mut facts = converged_facts();
        facts.firewall = FirewallState {
            active: false,
            incoming_denied: false,
            rules: vec!["allow 6379/tcp".into()],
            from_record: false,
        };
        let plan = plan_host(&desired(), &facts, None);
        assert_eq!(
            actions(&plan),
            vec![
                "firewall allow 22/tcp comment 'ssh' add",
                "firewall default incoming deny",
                "firewall ufw enable",
                "firewall allow 6379/tcp delete",
            ]
        );
    }

    #[test]
    fn stopped_service_is_started_and_enabled() {
        let mut facts = converged_facts();
        facts
            .services
            .insert("redis-server.service".into(), ServiceState::default());
        let plan = plan_host(&desired(), &facts, None);
        assert_eq!(
            actions(&plan),
            vec![
                "service redis-server.service enable",
                "service redis-server.service start",
            ]
        );
    }

    #[test]
    fn diff_redacts_secrets() {
        let mut facts = converged_facts();
        redis_conf(&mut facts).content = "requirepass old\n".into();
        let mut desired = desired();
        desired.files[0].content = "requirepass s3cret-value\n".into();
        let plan = plan_host(&desired, &facts, None);
        let secrets = Secrets::for_tests(&[("app.redis.password", "s3cret-value")]);
        let diff = plan.diffs(&secrets).join("");
        assert!(
            diff.contains("+requirepass <secret:app.redis.password>"),
            "{diff}"
        );
        assert!(!diff.contains("s3cret-value"), "{diff}");
        assert!(diff.contains("-requirepass <redacted>"), "{diff}");
        assert!(!diff.contains("requirepass old"), "{diff}");
    }

    #[test]
    fn binary_changed_in_place_reinstalled() {
        let binary = test_binary(&"ab".repeat(8), None);
        let mut facts = converged_facts();
        facts.worker_release = Some(binary.release.clone());
        let installs = |facts: &HostFacts| {
            plan_host(&desired(), facts, Some(&binary))
                .steps
                .iter()
                .any(|step| matches!(step, Step::InstallRelease { .. }))
        };
        assert!(!installs(&facts), "stamp matched: nothing to do");
        facts.worker_release_sha256 = Some(binary.sha256.clone());
        assert!(!installs(&facts), "stamp gone but the hash matches");
        facts.worker_release_sha256 = Some("cd".repeat(32));
        assert!(installs(&facts), "changed in place");
        facts.worker_release_sha256 = Some("missing".into());
        assert!(installs(&facts), "binary missing");
    }

    #[test]
    fn glibc_too_old_is_reported() {
        let binary = test_binary(&"0".repeat(16), Some((2, 34)));
        let old = crate::facts::Platform {
            machine: "x86_64".into(),
            glibc: Some("2.31".into()),
        };
        let arm = crate::facts::Platform {
            machine: "aarch64".into(),
            glibc: Some("2.36".into()),
        };
        let good = crate::facts::Platform {
            machine: "x86_64".into(),
            glibc: Some("2.36".into()),
        };
        assert!(binary
            .incompatibility(&old)
            .unwrap()
            .contains("needs glibc 2.34"));
        assert!(binary
            .incompatibility(&arm)
            .unwrap()
            .contains("built for x86_64"));
        assert_eq!(binary.incompatibility(&good), None);
    }

    #[test]
    fn own_test_binary_is_readable_elf() {
        let binary =
            WorkerBinary::load(&std::env::current_exe().unwrap()).expect("test binary is ELF");
        assert_eq!(binary.machine, std::env::consts::ARCH);
        assert!(binary.min_glibc.is_some());
    }
}
