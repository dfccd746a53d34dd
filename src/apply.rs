//! Carries out a host's plan: writes files beside their target and renames them, installs
//! the worker release and switches to it atomically, synchronises ufw, restarts what changed
//! and rolls the worker back when the new process does not report ready.

use std::time::Duration;

use serde::Serialize;

use crate::facts::{self, PENDING_RESTARTS_FILE};
use crate::inventory::Inventory;
use crate::plan::{Change, HostPlan, Step, WorkerBinary};
use crate::render::{worker_paths, RenderedFile};
use crate::secrets::Secrets;
use crate::ssh::{last_lines, Remote, RemoteCommand, SshError};

const PACKAGE_TIMEOUT: Duration = Duration::from_secs(900);
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);
const RESTART_TIMEOUT: Duration = Duration::from_secs(120);

/// Result of apply on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Unchanged,
    Changed,
    Failed,
    RolledBack,
    Skipped,
}

impl Outcome {
    pub fn is_success(self) -> bool {
        matches!(self, Outcome::Unchanged | Outcome::Changed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("cannot read the worker binary {}", path.display())]
    ReadBinary {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{unit} on host {host} did not become ready{}: {journal}",
        if *rolled_back { "; the previous release was put back and runs again" } else { "" })]
    NotReady {
        host: String,
        unit: String,
        journal: String,
        rolled_back: bool,
    },
}

/// Report of apply on one host: its changes, restarts and outcome.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub name: String,
    pub roles: Vec<String>,
    pub outcome: Outcome,
    pub changes: Vec<Change>,
    pub restarted: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Milliseconds from the start of the run until this host was done.
    pub duration_ms: u64,
}

/// Applies `plan` on the host behind `remote`, then makes sure PostgreSQL's role and database
/// exist on a postgres host.
pub async fn apply_host(
    remote: &Remote,
    inventory: &Inventory,
    plan: &HostPlan,
    secrets: &Secrets,
    worker: Option<&WorkerBinary>,
    report: &mut HostReport,
) -> Result<(), ApplyError> {
    let restarts: Vec<&str> = plan
        .steps
        .iter()
        .filter_map(|step| match step {
            Step::Restart(unit) => Some(unit.as_str()),
            _ => None,
        })
        .collect();
    if !restarts.is_empty() {
        record_pending_restarts(remote, &restarts).await?;
    }

    // Three lanes run side by side, as none uses what another changes. ufw is a Python
    // program started once per rule, so synchronising the firewall is slow. `systemctl
    // enable` of a unit with a SysV script runs Debian's update-rc.d, which is slow too. It
    // waits for the other steps only when a unit file changed, as it then needs the
    // daemon-reload first.
    let unit_files_change = plan
        .steps
        .iter()
        .any(|step| matches!(step, Step::DaemonReload));
    let mut firewall = Vec::new();
    let mut enable = Vec::new();
    let mut prepare = Vec::new();
    let mut activate = Vec::new();
    for step in &plan.steps {
        match step {
            _ if step.change().kind == "firewall" => firewall.push(step),
            Step::EnableService(_) if !unit_files_change => enable.push(step),
            Step::Restart(_) | Step::Start(_) | Step::Reload(_) => activate.push(step),
            _ => prepare.push(step),
        }
    }
    // The role and database are made on the running server while the files are written,
    // rather than after the restart. A server that is not running yet gets them after the
    // steps.
    let is_postgres = inventory.postgres_host().name == remote.host();
    let database_first = is_postgres
        && !plan.database_changes.is_empty()
        && !crate::postgres::waits_for_server(&plan.database_changes);
    let database = async {
        if database_first {
            crate::postgres::ensure_access(remote, inventory, secrets, false).await
        } else {
            Ok(Vec::new())
        }
    };
    let services = async {
        let (database, mut run) =
            tokio::join!(database, run_steps(remote, &prepare, inventory, worker));
        if run.failure.is_none() {
            if let Err(error) = &database {
                tracing::debug!(host = %remote.host(), %error, "role and database not made");
            } else {
                let restarts = run_steps(remote, &activate, inventory, worker).await;
                run.done.extend(restarts.done);
                run.failure = restarts.failure;
            }
        }
        (database, run)
    };
    let (firewall, enabled, (database, others)) = tokio::join!(
        run_steps(remote, &firewall, inventory, worker),
        run_steps(remote, &enable, inventory, worker),
        services,
    );

    let mut done: Vec<&Step> = firewall
        .done
        .iter()
        .chain(&enabled.done)
        .chain(&others.done)
        .copied()
        .collect();
    done.sort_by_key(|step| {
        plan.steps
            .iter()
            .position(|planned| std::ptr::eq(planned, *step))
    });
    for step in &done {
        report.changes.push(step.change());
        if let Step::Restart(unit) = step {
            report.restarted.push(unit.clone());
        }
    }

    match others.failure {
        Some((
            step,
            ApplyError::NotReady {
                host,
                unit,
                journal,
                ..
            },
        )) if unit == worker_paths::UNIT => {
            report.changes.push(step.change());
            let rolled_back = roll_back_worker(remote, &others.done, report).await?;
            if rolled_back {
                // The previous release runs again, so the worker's restart is no longer owed;
                // restarts not reached yet stay recorded for the next apply.
                let owed: Vec<&str> = restarts
                    .iter()
                    .copied()
                    .filter(|unit| {
                        *unit != worker_paths::UNIT
                            && !report.restarted.iter().any(|done| done == unit)
                    })
                    .collect();
                if owed.is_empty() {
                    clear_pending_restarts(remote).await?;
                } else {
                    record_pending_restarts(remote, &owed).await?;
                }
            }
            return Err(ApplyError::NotReady {
                host,
                unit,
                journal,
                rolled_back,
            });
        }
        Some((_, error)) => return Err(error),
        None => {}
    }
    if let Some((_, error)) = firewall.failure.or(enabled.failure) {
        return Err(error);
    }
    if let Some(rules) = &plan.firewall_record {
        record_firewall(remote, rules).await?;
    }
    report.changes.extend(database?);

    let installed_release = plan
        .steps
        .iter()
        .any(|step| matches!(step, Step::InstallRelease { .. }));
    if installed_release {
        prune_releases(remote).await?;
    }

    // The check ran while planning; it runs again only when something may have changed it.
    if is_postgres && !plan.is_empty() && !database_first {
        let changes = crate::postgres::ensure_access(remote, inventory, secrets, false).await?;
        report.changes.extend(changes);
    }

    if !restarts.is_empty() || !plan.is_empty() {
        clear_pending_restarts(remote).await?;
    }
    Ok(())
}

/// Records the firewall as in sync with `rules`, under the checksum of ufw's state files as
/// they are now, so the next run can skip reading ufw while nothing changed them.
async fn record_firewall(remote: &Remote, rules: &[String]) -> Result<(), SshError> {
    let script = format!(
        r#"set -e
mkdir -p -- "$(dirname -- "$1")"
{{ {checksum}; cat; }} > "$1.new"
mv -- "$1.new" "$1""#,
        checksum = facts::UFW_CHECKSUM_SCRIPT
    );
    let content: String = rules.iter().map(|rule| format!("{rule}\n")).collect();
    let command = RemoteCommand::script(
        "record the firewall rules",
        &script,
        &[facts::FIREWALL_RECORD_FILE],
    )
    .stdin(content)
    .as_root();
    remote.run(&command).await?;
    Ok(())
}

/// The steps of one sequence that ran, and the step that failed with its error.
struct StepsRun<'a> {
    done: Vec<&'a Step>,
    failure: Option<(&'a Step, ApplyError)>,
}

/// Runs `steps` in order and stops at the first that fails.
async fn run_steps<'a>(
    remote: &Remote,
    steps: &[&'a Step],
    inventory: &Inventory,
    worker: Option<&WorkerBinary>,
) -> StepsRun<'a> {
    let mut run = StepsRun {
        done: Vec::new(),
        failure: None,
    };
    for step in steps {
        tracing::info!(host = %remote.host(), "{}", describe(step));
        match run_step(remote, step, inventory, worker).await {
            Ok(()) => run.done.push(step),
            Err(error) => {
                run.failure = Some((step, error));
                break;
            }
        }
    }
    run
}

/// Describes a step in one line for progress output.
fn describe(step: &Step) -> String {
    let change = step.change();
    format!("{} {} {}", change.action, change.kind, change.target)
}

async fn run_step(
    remote: &Remote,
    step: &Step,
    inventory: &Inventory,
    worker: Option<&WorkerBinary>,
) -> Result<(), ApplyError> {
    match step {
        Step::InstallPackages(packages) => install_packages(remote, packages).await?,
        Step::CreateSystemUser(user) => {
            let command = RemoteCommand::new("useradd")
                .args(["--system", "--user-group", "--no-create-home"])
                .args([
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    user,
                ])
                .as_root();
            remote.run(&command).await?;
        }
        Step::WriteFile { file, .. } => write_file(remote, file).await?,
        Step::EnsureLastLine(line) => {
            let current = facts::read_file(remote, &line.path).await?;
            let (content, mode, owner, group) = match &current {
                Some(file) => (
                    file.content.as_str(),
                    file.mode,
                    file.owner.clone(),
                    file.group.clone(),
                ),
                None => ("", 0o644, "root".to_string(), "root".to_string()),
            };
            let file = RenderedFile {
                path: line.path.clone(),
                content: with_last_line(content, &line.line),
                mode,
                owner,
                group,
                triggers: line.triggers.clone(),
            };
            write_file(remote, &file).await?;
        }
        Step::InstallRelease { release, .. } => {
            let worker = worker.expect("a release step is planned only with a worker binary");
            install_release(remote, worker, release).await?;
        }
        Step::DaemonReload => systemctl(remote, &["daemon-reload"], RESTART_TIMEOUT).await?,
        Step::AddFirewallRule(rule) => {
            let command = RemoteCommand::new("ufw").args(split_rule(rule)).as_root();
            remote.run(&command).await?;
        }
        Step::DeleteFirewallRule(rule) => {
            let command = RemoteCommand::new("ufw")
                .arg("delete")
                .args(split_rule(rule))
                .as_root();
            remote.run(&command).await?;
        }
        Step::DenyIncomingByDefault => {
            remote
                .run(
                    &RemoteCommand::new("ufw")
                        .args(["default", "deny", "incoming"])
                        .as_root(),
                )
                .await?;
            remote
                .run(
                    &RemoteCommand::new("ufw")
                        .args(["default", "allow", "outgoing"])
                        .as_root(),
                )
                .await?;
        }
        Step::EnableFirewall => {
            remote
                .run(
                    &RemoteCommand::new("ufw")
                        .args(["--force", "enable"])
                        .as_root(),
                )
                .await?;
        }
        Step::EnableService(unit) => systemctl(remote, &["enable", unit], RESTART_TIMEOUT).await?,
        Step::Reload(unit) => systemctl(remote, &["reload", unit], RESTART_TIMEOUT).await?,
        Step::Restart(unit) | Step::Start(unit) => {
            let verb = if matches!(step, Step::Restart(_)) {
                "restart"
            } else {
                "start"
            };
            let timeout = if unit == worker_paths::UNIT {
                Duration::from_secs(inventory.app.worker.ready_timeout_secs)
                    + Duration::from_secs(30)
            } else {
                RESTART_TIMEOUT
            };
            start_unit(remote, verb, unit, timeout).await?;
        }
    }
    Ok(())
}

async fn install_packages(remote: &Remote, packages: &[String]) -> Result<(), SshError> {
    let install = RemoteCommand::new("env")
        .args([
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
        ])
        .args(packages.iter().cloned())
        .as_root()
        .timeout(PACKAGE_TIMEOUT);
    if remote.output(&install).await?.success() {
        return Ok(());
    }
    // A stale package list is the usual cause; refresh it once and try again.
    tracing::info!(host = %remote.host(), "package install failed; refreshing the package lists and retrying once");
    let update = RemoteCommand::new("apt-get")
        .args(["update", "-q"])
        .as_root()
        .timeout(PACKAGE_TIMEOUT);
    remote.run(&update).await?;
    remote.run(&install).await?;
    Ok(())
}

/// Writes `file` beside its target, sets owner and mode, then renames it into place, so a
/// reader never sees a half-written file.
pub async fn write_file(remote: &Remote, file: &RenderedFile) -> Result<(), SshError> {
    let script = r#"set -e
umask 077
mkdir -p -- "$(dirname -- "$1")"
tmp="$1.yametee-tmp"
cat > "$tmp"
chown -- "$2:$3" "$tmp"
chmod -- "$4" "$tmp"
mv -f -- "$tmp" "$1""#;
    let mode = format!("{:o}", file.mode);
    let command = RemoteCommand::script(
        &format!("write {}", file.path),
        script,
        &[&file.path, &file.owner, &file.group, &mode],
    )
    .as_root()
    .stdin(file.content.as_bytes().to_vec());
    remote.run(&command).await?;
    Ok(())
}

fn with_last_line(content: &str, line: &str) -> String {
    let mut lines: Vec<&str> = content
        .lines()
        .filter(|existing| existing.trim() != line)
        .collect();
    while lines.last().is_some_and(|last| last.trim().is_empty()) {
        lines.pop();
    }
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push_str("\n\n");
    }
    text.push_str(line);
    text.push('\n');
    text
}

/// Uploads the worker binary into its own release directory and points `current` at it.
/// The running binary is never written over, which would fail with "Text file busy".
async fn install_release(
    remote: &Remote,
    worker: &WorkerBinary,
    release: &str,
) -> Result<(), ApplyError> {
    let bytes = std::fs::read(&worker.path).map_err(|source| ApplyError::ReadBinary {
        path: worker.path.clone(),
        source,
    })?;
    let directory = format!("{}/{release}", worker_paths::RELEASES_DIR);
    let upload = r#"set -e
dir="$1"
mkdir -p -- "$dir"
stamp() { stat -c '%s %Y %i' -- "$dir/$2" > "$dir/$4"; }
if [ -x "$dir/$2" ] && echo "$3  $dir/$2" | sha256sum --check --status; then
  cat > /dev/null
  stamp "$@"
  exit 0
fi
umask 022
cat > "$dir/$2.tmp"
echo "$3  $dir/$2.tmp" | sha256sum --check --status || { rm -f -- "$dir/$2.tmp"; echo "uploaded binary has the wrong sha256" >&2; exit 1; }
chmod 0755 "$dir/$2.tmp"
mv -f -- "$dir/$2.tmp" "$dir/$2"
stamp "$@""#;
    let command = RemoteCommand::script(
        &format!("upload the worker binary to {directory}"),
        upload,
        &[
            &directory,
            worker_paths::BINARY_NAME,
            &worker.sha256,
            worker_paths::STAMP_NAME,
        ],
    )
    .as_root()
    .stdin(bytes)
    .timeout(UPLOAD_TIMEOUT);
    remote.run(&command).await?;
    Ok(switch_release(remote, &directory).await?)
}

async fn switch_release(remote: &Remote, directory: &str) -> Result<(), SshError> {
    let switch = r#"set -e
ln -sfn -- "$1" "$2.tmp"
mv -Tf -- "$2.tmp" "$2""#;
    let command = RemoteCommand::script(
        &format!("switch {} to {directory}", worker_paths::CURRENT_LINK),
        switch,
        &[directory, worker_paths::CURRENT_LINK],
    )
    .as_root();
    remote.run(&command).await?;
    Ok(())
}

/// Releases kept on a worker host besides the current one, newest first, so that a rollback
/// has somewhere to go.
const KEPT_PREVIOUS_RELEASES: usize = 2;

/// Deletes the oldest release directories, never the current one.
async fn prune_releases(remote: &Remote) -> Result<(), SshError> {
    let script = r#"set -e
cd -- "$1"
current=$(basename -- "$(readlink -- "$2")")
ls -1t | while read -r release; do
  [ "$release" = "$current" ] && continue
  kept=$((${kept:-0} + 1))
  [ "$kept" -le "$3" ] || rm -rf -- "./$release"
done"#;
    let keep = KEPT_PREVIOUS_RELEASES.to_string();
    let command = RemoteCommand::script(
        "delete old worker releases",
        script,
        &[
            worker_paths::RELEASES_DIR,
            worker_paths::CURRENT_LINK,
            &keep,
        ],
    )
    .as_root();
    remote.run(&command).await?;
    Ok(())
}

async fn systemctl(remote: &Remote, args: &[&str], timeout: Duration) -> Result<(), SshError> {
    let command = RemoteCommand::new("systemctl")
        .args(args.iter().copied())
        .as_root()
        .timeout(timeout);
    remote.run(&command).await?;
    Ok(())
}

/// Starts or restarts `unit` and waits for it to be active. With `Type=notify`, systemctl
/// returns only once the service reported ready or its start timed out.
async fn start_unit(
    remote: &Remote,
    verb: &str,
    unit: &str,
    timeout: Duration,
) -> Result<(), ApplyError> {
    let command = RemoteCommand::new("systemctl")
        .args([verb, unit])
        .as_root()
        .timeout(timeout);
    let output = remote.output(&command).await;
    let started = matches!(&output, Ok(output) if output.success());
    if started {
        return Ok(());
    }
    let journal = unit_journal(remote, unit).await;
    let reason = match output {
        Ok(output) => last_lines(&output.stderr, 2),
        Err(error) => error.to_string(),
    };
    Err(ApplyError::NotReady {
        host: remote.host().to_string(),
        unit: unit.to_string(),
        journal: format!("{reason}; last log lines: {journal}"),
        rolled_back: false,
    })
}

async fn unit_journal(remote: &Remote, unit: &str) -> String {
    let command = RemoteCommand::new("journalctl")
        .args(["-u", unit, "-n", "8", "--no-pager", "-o", "cat"])
        .as_root();
    match remote.output(&command).await {
        Ok(output) => last_lines(&output.stdout, 8),
        Err(error) => format!("(journal unavailable: {error})"),
    }
}

/// Puts the previous worker release, unit and environment back after a failed start and
/// restarts the worker. Returns false when there was nothing to go back to and the worker was
/// stopped instead.
async fn roll_back_worker(
    remote: &Remote,
    applied: &[&Step],
    report: &mut HostReport,
) -> Result<bool, ApplyError> {
    let previous_release = applied.iter().find_map(|step| match step {
        Step::InstallRelease { previous, .. } => Some(previous.clone()),
        _ => None,
    });
    let mut restored_any = false;
    for step in applied {
        if let Step::WriteFile {
            file,
            previous: Some(previous),
        } = step
        {
            if file
                .triggers
                .iter()
                .any(|t| matches!(t, crate::render::Trigger::Restart(u) if u == worker_paths::UNIT))
            {
                let mut old = file.clone();
                old.content = previous.content.clone();
                old.mode = previous.mode;
                old.owner = previous.owner.clone();
                old.group = previous.group.clone();
                write_file(remote, &old).await?;
                restored_any = true;
            }
        }
    }
    let previous_release = previous_release.flatten();
    if let Some(previous) = &previous_release {
        switch_release(
            remote,
            &format!("{}/{previous}", worker_paths::RELEASES_DIR),
        )
        .await?;
        restored_any = true;
    }

    if !restored_any {
        // Nothing to go back to: stop the unit rather than let it fail in a restart loop.
        tracing::warn!(host = %remote.host(), "no previous worker release to roll back to; stopping the worker");
        systemctl(remote, &["stop", worker_paths::UNIT], RESTART_TIMEOUT).await?;
        return Ok(false);
    }

    tracing::warn!(
        host = %remote.host(),
        release = previous_release.as_deref().unwrap_or("none"),
        "rolling the worker back to the previous release"
    );
    systemctl(remote, &["daemon-reload"], RESTART_TIMEOUT).await?;
    start_unit(remote, "restart", worker_paths::UNIT, RESTART_TIMEOUT).await?;
    report.outcome = Outcome::RolledBack;
    Ok(true)
}

async fn record_pending_restarts(remote: &Remote, units: &[&str]) -> Result<(), SshError> {
    let mut content = units.join("\n");
    content.push('\n');
    let file = RenderedFile {
        path: PENDING_RESTARTS_FILE.into(),
        content,
        mode: 0o644,
        owner: "root".into(),
        group: "root".into(),
        triggers: Vec::new(),
    };
    write_file(remote, &file).await
}

async fn clear_pending_restarts(remote: &Remote) -> Result<(), SshError> {
    remote
        .run(
            &RemoteCommand::new("rm")
                .args(["-f", "--", PENDING_RESTARTS_FILE])
                .as_root(),
        )
        .await?;
    Ok(())
}

/// Splits a ufw rule line into arguments; a single-quoted part (a comment) stays one argument.
pub fn split_rule(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '\'' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_rule_keeps_quoted_comment() {
        assert_eq!(
            split_rule(
                "allow from 10.0.0.5 to any port 6379 proto tcp comment 'redis from worker'"
            ),
            vec![
                "allow",
                "from",
                "10.0.0.5",
                "to",
                "any",
                "port",
                "6379",
                "proto",
                "tcp",
                "comment",
                "redis from worker"
            ]
        );
    }

    #[test]
    fn last_line_moves_to_the_end() {
        let content = "port 6379\ninclude /etc/redis/yametee.conf\nsave 60 1\n\n";
        assert_eq!(
            with_last_line(content, "include /etc/redis/yametee.conf"),
            "port 6379\nsave 60 1\n\ninclude /etc/redis/yametee.conf\n"
        );
        assert_eq!(with_last_line("", "x"), "x\n");
    }
}
