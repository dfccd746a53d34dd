//! The verification suite: each manual check of the worker runbook as a named check, run on
//! the host whose network position it is about, all hosts and checks in parallel.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde::Serialize;

use crate::deploy::{error_chain, role_names};
use crate::facts;
use crate::inventory::{Host, Inventory, Role};
use crate::plan::WorkerBinary;
use crate::queue;
use crate::render::{worker_paths, Renderer, POSTGRES_UNIT, REDIS_UNIT};
use crate::secrets::Secrets;
use crate::ssh::{last_lines, Destination, Remote, RemoteCommand, SshError, SshOverrides};
use crate::status::HEARTBEAT_KEY_PREFIX;

/// Lines the worker logs at every start, in the order it logs them.
pub fn startup_lines(worker_name: &str) -> Vec<String> {
    vec![
        "Environment validation passed".to_string(),
        "Database connection successful".to_string(),
        "Redis connection successful".to_string(),
        format!("Worker {worker_name} started"),
        format!("Worker {worker_name} ready and waiting for jobs"),
    ]
}

/// Key the worker writes when it processed a `verify:probe` job.
pub const PROBE_KEY_PREFIX: &str = "yametee:probe:";
/// Seconds a connection that the firewall must drop is given before it counts as blocked. On
/// the private network between the hosts a connection that is allowed opens in milliseconds.
const BLOCKED_PROBE_SECS: &str = "1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub id: String,
    pub status: Status,
    pub detail: String,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostResult {
    pub name: String,
    /// The host's roles joined by commas, such as `worker` or `postgres,redis`.
    pub role: String,
    pub roles: Vec<String>,
    pub checks: Vec<CheckResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub hosts: Vec<HostResult>,
}

impl VerifyReport {
    pub fn count(&self, status: Status) -> usize {
        self.hosts
            .iter()
            .flat_map(|host| &host.checks)
            .filter(|check| check.status == status)
            .count()
    }
}

/// The inputs of a verification run.
pub struct Verifier<'a> {
    pub inventory: &'a Inventory,
    pub secrets: &'a Secrets,
    pub ssh: &'a SshOverrides,
    pub worker: Option<&'a WorkerBinary>,
    pub renderer: &'a Renderer,
    /// Names of the hosts to verify (`--limit`).
    pub targets: &'a [String],
    /// Check ids or id prefixes to run (`--check`); empty runs every check.
    pub only: &'a [String],
    /// How long the end-to-end check waits for the probe job's result.
    pub probe_timeout: Duration,
}

/// Whether `id` is selected by `--check` patterns: an exact id, or a prefix such as `worker`
/// or `worker.` that selects every `worker.…` check.
pub fn check_selected(id: &str, only: &[String]) -> bool {
    only.is_empty()
        || only.iter().any(|pattern| {
            let prefix = pattern.trim_end_matches(['.', '*']);
            id == pattern
                || id
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.'))
        })
}

/// Reason a check did not pass.
enum NotPassed {
    Fail(String),
    /// The check could not be run meaningfully, for a reason that is not a fault of the host.
    Skip(String),
}

impl From<String> for NotPassed {
    fn from(detail: String) -> NotPassed {
        NotPassed::Fail(detail)
    }
}

impl From<&str> for NotPassed {
    fn from(detail: &str) -> NotPassed {
        NotPassed::Fail(detail.to_string())
    }
}

/// A check's detail when it passed.
type CheckOutcome = Result<String, NotPassed>;

type CheckFuture<'a> = Pin<Box<dyn Future<Output = CheckOutcome> + Send + 'a>>;

impl<'a> Verifier<'a> {
    pub async fn run(&self) -> VerifyReport {
        let targets = self
            .inventory
            .hosts
            .iter()
            .filter(|host| self.targets.contains(&host.name));
        let hosts = join_all(targets.map(|host| self.verify_host(host))).await;
        // Only a run in which every check passed is a success: a skipped check proved nothing.
        let ok = hosts
            .iter()
            .all(|host| host.checks.iter().all(|check| check.status == Status::Pass));
        VerifyReport { ok, hosts }
    }

    async fn verify_host(&self, host: &Host) -> HostResult {
        let mut result = HostResult {
            name: host.name.clone(),
            role: role_names(host).join(","),
            roles: role_names(host),
            checks: Vec::new(),
        };

        let started = Instant::now();
        let remote = match Remote::connect(Destination::for_host(host, self.ssh)).await {
            Ok(remote) => {
                result.checks.push(pass(
                    "ssh.reachable",
                    format!("{}@{}:{}", host.ssh.user, host.address, host.ssh.port),
                    started,
                ));
                remote
            }
            Err(error) => {
                result
                    .checks
                    .push(fail("ssh.reachable", error_chain(&error), started));
                for id in self
                    .check_ids(host)
                    .into_iter()
                    .filter(|id| check_selected(id, self.only))
                {
                    result.checks.push(CheckResult {
                        id,
                        status: Status::Skip,
                        detail: "not run: the host is unreachable".into(),
                        duration_ms: 0,
                    });
                }
                return result;
            }
        };

        let checks = self
            .checks(host, &remote)
            .into_iter()
            .filter(|(id, _)| check_selected(id, self.only));
        let timed = checks.into_iter().map(|(id, check)| async move {
            let started = Instant::now();
            let outcome = check.await;
            let duration_ms = started.elapsed().as_millis() as u64;
            match outcome {
                Ok(detail) => CheckResult {
                    id,
                    status: Status::Pass,
                    detail: self.secrets.redact(&detail),
                    duration_ms,
                },
                Err(NotPassed::Fail(detail)) => CheckResult {
                    id,
                    status: Status::Fail,
                    detail: self.secrets.redact(&detail),
                    duration_ms,
                },
                Err(NotPassed::Skip(detail)) => CheckResult {
                    id,
                    status: Status::Skip,
                    detail: self.secrets.redact(&detail),
                    duration_ms,
                },
            }
        });
        result.checks.extend(join_all(timed).await);
        remote.close().await;
        result
    }

    /// Every check id the suite has for the selected hosts, for validating `--check`.
    pub fn all_check_ids(&self) -> Vec<String> {
        let mut ids = vec!["ssh.reachable".to_string()];
        for host in self
            .inventory
            .hosts
            .iter()
            .filter(|host| self.targets.contains(&host.name))
        {
            for id in self.check_ids(host) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    fn check_ids(&self, host: &Host) -> Vec<String> {
        // The same list `checks` builds, without running anything.
        let mut ids = vec!["firewall.rules".to_string()];
        for unit in units_of(host) {
            ids.push(format!("unit.{}", unit.trim_end_matches(".service")));
        }
        ids.extend(self.role_check_ids(host));
        ids
    }

    fn role_check_ids(&self, host: &Host) -> Vec<String> {
        let mut ids = Vec::new();
        if host.has_role(Role::Postgres) {
            ids.push("postgres.listening".to_string());
        }
        if host.has_role(Role::Redis) {
            ids.extend(["redis.listening".to_string(), "queue.depth".to_string()]);
        }
        if host.has_role(Role::Worker) {
            ids.extend(
                [
                    "worker.startup-log",
                    "worker.redis-ping",
                    "worker.postgres-select1",
                    "worker.binary-hash",
                    "worker.memory",
                ]
                .map(String::from),
            );
        }
        if host.has_role(Role::Web) {
            ids.extend(["web.redis-ping", "web.postgres-select1"].map(String::from));
        }
        if self
            .probe_host()
            .is_some_and(|probe| probe.name == host.name)
        {
            ids.push("e2e.probe-job".to_string());
        }
        for (id, _, _) in self.blocked_targets(host) {
            ids.push(id);
        }
        ids
    }

    fn checks<'b>(&'b self, host: &'b Host, remote: &'b Remote) -> Vec<(String, CheckFuture<'b>)> {
        let mut checks: Vec<(String, CheckFuture<'b>)> = Vec::new();
        checks.push((
            "firewall.rules".into(),
            Box::pin(self.firewall_rules(host, remote)),
        ));
        for unit in units_of(host) {
            let id = format!("unit.{}", unit.trim_end_matches(".service"));
            checks.push((id, Box::pin(unit_running(remote, unit))));
        }

        let app = &self.inventory.app;
        let redis = self.inventory.redis_host();
        let postgres = self.inventory.postgres_host();
        if host.has_role(Role::Postgres) {
            checks.push((
                "postgres.listening".into(),
                Box::pin(listening(remote, host, app.database.port)),
            ));
        }
        if host.has_role(Role::Redis) {
            checks.push((
                "redis.listening".into(),
                Box::pin(listening(remote, host, app.redis.port)),
            ));
            checks.push(("queue.depth".into(), Box::pin(self.queue_depth(remote))));
        }
        if host.has_role(Role::Worker) {
            checks.push((
                "worker.startup-log".into(),
                Box::pin(self.startup_log(remote)),
            ));
            checks.push((
                "worker.redis-ping".into(),
                Box::pin(self.redis_ping(remote, redis.address.to_string())),
            ));
            checks.push((
                "worker.postgres-select1".into(),
                Box::pin(self.select_one(remote, postgres.address.to_string())),
            ));
            checks.push((
                "worker.binary-hash".into(),
                Box::pin(self.binary_hash(remote)),
            ));
            checks.push(("worker.memory".into(), Box::pin(self.worker_memory(remote))));
        }
        if host.has_role(Role::Web) {
            checks.push((
                "web.redis-ping".into(),
                Box::pin(self.redis_ping(remote, redis.address.to_string())),
            ));
            checks.push((
                "web.postgres-select1".into(),
                Box::pin(self.select_one(remote, postgres.address.to_string())),
            ));
        }
        if self
            .probe_host()
            .is_some_and(|probe| probe.name == host.name)
        {
            checks.push(("e2e.probe-job".into(), Box::pin(self.probe_job(remote))));
        }
        for (id, address, port) in self.blocked_targets(host) {
            checks.push((id, Box::pin(blocked(remote, address, port))));
        }
        checks
    }

    /// The host that pushes the end-to-end probe job: the web platform, as in production,
    /// or a worker when there is no web host.
    fn probe_host(&self) -> Option<&Host> {
        self.inventory
            .hosts_with(Role::Web)
            .next()
            .or_else(|| self.inventory.hosts_with(Role::Worker).next())
    }

    /// Data stores that `host` must not reach, because it is neither a client nor the store.
    fn blocked_targets(&self, host: &Host) -> Vec<(String, String, u16)> {
        let is_client = host.has_role(Role::Worker) || host.has_role(Role::Web);
        if is_client {
            return Vec::new();
        }
        let app = &self.inventory.app;
        let mut targets = Vec::new();
        let redis = self.inventory.redis_host();
        if redis.name != host.name {
            targets.push((
                "firewall.blocks-redis".into(),
                redis.address.to_string(),
                app.redis.port,
            ));
        }
        let postgres = self.inventory.postgres_host();
        if postgres.name != host.name {
            targets.push((
                "firewall.blocks-postgres".into(),
                postgres.address.to_string(),
                app.database.port,
            ));
        }
        targets
    }

    async fn firewall_rules(&self, host: &Host, remote: &Remote) -> CheckOutcome {
        let desired = self
            .renderer
            .render_host(self.inventory, host, &Secrets::placeholders(self.inventory))
            .map_err(|error| error_chain(&error))?;
        let state = facts::firewall_state(remote)
            .await
            .map_err(|error| error_chain(&error))?;
        if !state.active {
            return Err("ufw is inactive".into());
        }
        if !state.incoming_denied {
            return Err("ufw does not deny incoming traffic by default".into());
        }
        let missing: Vec<&String> = desired
            .firewall_rules
            .iter()
            .filter(|rule| !state.rules.contains(rule))
            .collect();
        let extra: Vec<&String> = state
            .rules
            .iter()
            .filter(|rule| !desired.firewall_rules.contains(rule))
            .collect();
        let quoted = |rules: &[&String]| {
            rules
                .iter()
                .map(|rule| format!("`{rule}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!("missing: {}", quoted(&missing)));
        }
        if !extra.is_empty() {
            problems.push(format!("not in the inventory: {}", quoted(&extra)));
        }
        if !problems.is_empty() {
            return Err(format!(
                "{}; run `sudo ufw show added` on the host; apply restores the rendered rules",
                problems.join("; ")
            )
            .into());
        }
        let count = state.rules.len();
        Ok(format!(
            "active, incoming denied, {count} rule{} as rendered",
            if count == 1 { "" } else { "s" }
        ))
    }

    async fn queue_depth(&self, remote: &Remote) -> CheckOutcome {
        let queue = &self.inventory.app.queue;
        let script = r#"IFS= read -r REDISCLI_AUTH; export REDISCLI_AUTH
q="$1"; port="$2"
cli() { timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@"; }
pong=$(cli PING 2>&1)
[ "$pong" = PONG ] || { printf '%s\n' "$pong" >&2; exit 1; }
echo "pending $(cli LLEN "$q")"
inflight=0
for key in $(cli --scan --pattern "$q:inflight:*"); do
  inflight=$((inflight + $(cli LLEN "$key")))
done
echo "in_flight $inflight"
echo "retry $(cli ZCARD "$q:retry")"
echo "dead $(cli LLEN "$q:dead")""#;
        let port = self.inventory.app.redis.port.to_string();
        let command = RemoteCommand::script("read the queue depths", script, &[queue, &port])
            .stdin(format!("{}\n", self.secrets.get("app.redis.password")));
        let output = remote
            .output(&command)
            .await
            .map_err(|error| error_chain(&error))?;
        if !output.success() {
            return Err(format!(
                "cannot read the queue depths: redis-cli PING on the Redis host answered {:?}; \
                 see `sudo systemctl status redis-server` there",
                output.stderr.trim()
            )
            .into());
        }
        let output = output.stdout;

        let thresholds = &self.inventory.app.thresholds;
        let limits = [
            ("pending", thresholds.pending),
            ("in_flight", thresholds.in_flight),
            ("retry", thresholds.retry),
            ("dead", thresholds.dead),
        ];
        let mut shown = Vec::new();
        let mut over = Vec::new();
        for (name, limit) in limits {
            let value = output
                .lines()
                .find_map(|line| {
                    line.strip_prefix(name)
                        .and_then(|rest| rest.trim().parse::<u64>().ok())
                })
                .ok_or_else(|| {
                    format!(
                        "cannot read the {name} depth from redis-cli: {}",
                        output.trim()
                    )
                })?;
            shown.push(format!("{} {value}", name.replace('_', "-")));
            if value >= limit {
                over.push(format!(
                    "{} {value} reaches the threshold {limit}",
                    name.replace('_', "-")
                ));
            }
        }
        if over.is_empty() {
            Ok(shown.join(", "))
        } else {
            Err(format!(
                "{} (thresholds are under app.thresholds in the inventory); see \
                 `yametee-deploy status` (with the same options), and the failed jobs with \
                 `redis-cli LRANGE {queue}:dead 0 9` on the Redis host (password in \
                 REDISCLI_AUTH)",
                over.join("; ")
            )
            .into())
        }
    }

    async fn startup_log(&self, remote: &Remote) -> CheckOutcome {
        let script = r#"systemctl is-active --quiet "$1" || { echo "$1 is not running" >&2; exit 1; }
id=$(systemctl show -p InvocationID --value "$1")
[ -n "$id" ] || { echo "no current run of $1" >&2; exit 1; }
journalctl --no-pager -o cat "_SYSTEMD_INVOCATION_ID=$id""#;
        let command = RemoteCommand::script(
            "read the worker's log of its current run",
            script,
            &[worker_paths::UNIT],
        )
        .as_root();
        let log = run(remote, &command).await?;
        let missing: Vec<String> = startup_lines(&self.inventory.app.worker.name)
            .into_iter()
            .filter(|line| !log.lines().any(|logged| logged.contains(line.as_str())))
            .collect();
        if missing.is_empty() {
            Ok("all 5 startup lines logged by the current run".into())
        } else {
            Err(format!(
                "missing from the current run's log: {}; see `sudo journalctl -u {} -n 50`",
                missing.join("; "),
                worker_paths::UNIT
            )
            .into())
        }
    }

    async fn redis_ping(&self, remote: &Remote, address: String) -> CheckOutcome {
        let port = self.inventory.app.redis.port;
        let label = format!("redis-cli -h {address} PING");
        let command = queue::redis_cli_within(self.inventory, self.secrets, &label, &["PING"], 3);
        let output = remote
            .output(&command)
            .await
            .map_err(|error| error_chain(&error))?;
        if output.status == Some(124) {
            return Err(format!(
                "expected PONG from {address}:{port}; no answer within 3 s from host {}: a \
                 firewall may drop the connection; see `sudo ufw status` on the Redis host",
                remote.host()
            )
            .into());
        }
        let reply = match output.stdout.trim() {
            "" => output.stderr.trim().to_string(),
            reply => reply.to_string(),
        };
        if reply.trim() == "PONG" {
            Ok(format!("PONG from {address}:{port}"))
        } else {
            Err(format!(
                "redis-cli PING to {address}:{port} returned {:?}",
                reply.trim()
            )
            .into())
        }
    }

    async fn select_one(&self, remote: &Remote, address: String) -> CheckOutcome {
        let database = &self.inventory.app.database;
        let script = r#"IFS= read -r PGPASSWORD; export PGPASSWORD
export PGCONNECT_TIMEOUT=3
exec psql -X -A -t -q -w -h "$1" -p "$2" -U "$3" -d "$4" -c 'SELECT 1'"#;
        let port = database.port.to_string();
        let command = RemoteCommand::script(
            &format!("psql -h {address} -c 'SELECT 1'"),
            script,
            &[&address, &port, &database.user, &database.name],
        )
        .stdin(format!("{}\n", self.secrets.get("app.database.password")));
        let output = remote
            .output(&command)
            .await
            .map_err(|error| error_chain(&error))?;
        if output.stderr.contains("timeout expired") {
            return Err(format!(
                "expected SELECT 1 from {address}:{port}; no answer within 3 s from host {}: a \
                 firewall may drop the connection; see `sudo ufw status` on the PostgreSQL host",
                remote.host()
            )
            .into());
        }
        if !output.success() {
            return Err(format!(
                "SELECT 1 on {address}:{port} as {} failed: {}",
                database.user,
                last_lines(&output.stderr, 3)
            )
            .into());
        }
        let reply = output.stdout;
        if reply.trim() == "1" {
            Ok(format!(
                "SELECT 1 as {} on {address}:{port}/{}",
                database.user, database.name
            ))
        } else {
            Err(format!("SELECT 1 returned {:?}", reply.trim()).into())
        }
    }

    async fn binary_hash(&self, remote: &Remote) -> CheckOutcome {
        let path = format!(
            "{}/{}",
            worker_paths::CURRENT_LINK,
            worker_paths::BINARY_NAME
        );
        let output = run(remote, &RemoteCommand::new("sha256sum").arg(&path)).await?;
        let installed = output
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let Some(worker) = self.worker else {
            return Err(NotPassed::Skip(format!(
                "installed {installed}; no local worker binary to compare with (pass --worker-binary)"
            )));
        };
        if installed == worker.sha256 {
            Ok(format!(
                "sha256 {} matches {}",
                &installed[..16],
                worker.path.display()
            ))
        } else {
            Err(format!(
                "installed sha256 {installed} differs from {} ({}); apply installs this build \
                 again",
                worker.sha256,
                worker.path.display()
            )
            .into())
        }
    }

    async fn worker_memory(&self, remote: &Remote) -> CheckOutcome {
        let script = r#"pid=$(systemctl show -p MainPID --value "$1")
[ "$pid" -gt 0 ] 2>/dev/null || { echo "$1 has no main process" >&2; exit 1; }
ps -o rss= -p "$pid""#;
        let output = run(
            remote,
            &RemoteCommand::script(
                "read the worker's resident memory",
                script,
                &[worker_paths::UNIT],
            ),
        )
        .await?;
        let kib: u64 = output
            .trim()
            .parse()
            .map_err(|_| format!("cannot parse the RSS {:?}", output.trim()))?;
        let budget_mb = self.inventory.app.worker.memory_budget_mb;
        let mib = kib as f64 / 1024.0;
        if kib <= budget_mb * 1024 {
            Ok(format!("{mib:.1} MiB resident, budget {budget_mb} MiB"))
        } else {
            Err(format!("{mib:.1} MiB resident exceeds the budget of {budget_mb} MiB").into())
        }
    }

    /// Pushes `verify:probe` jobs in the web platform's format, one after the other, until
    /// every worker instance with a heartbeat has processed one, and reads the result each
    /// worker writes: proof that every worker consumes, not only that one does. There must be
    /// a heartbeat for each worker host of the inventory.
    async fn probe_job(&self, remote: &Remote) -> CheckOutcome {
        let expected = self.inventory.hosts_with(Role::Worker).count();
        let alive = self.worker_heartbeats(remote).await?;
        // An idle worker waits in BLMOVE, and Redis hands the jobs of one push to the waiting
        // workers one each, longest waiting first. So the first round sends one probe per
        // worker, and a worker that was busy gets one of the probes sent one by one after it.
        // Probes go on until as many workers as the inventory has took one, because a worker
        // whose heartbeat expired while Redis was down still consumes. The bound leaves room
        // for uneven turns.
        let max_probes = 4 * expected.max(alive.len()).max(1) + 1;
        let mut latencies_by_worker: BTreeMap<String, Vec<u128>> = BTreeMap::new();
        let started = Instant::now();
        let mut sent = 0;
        let mut round = alive.len().max(1);
        while sent < max_probes && started.elapsed() < self.probe_timeout {
            let covered = alive
                .iter()
                .all(|instance| latencies_by_worker.contains_key(instance))
                && latencies_by_worker.len() >= expected;
            if sent > 0 && covered {
                break;
            }
            let remaining = self.probe_timeout.saturating_sub(started.elapsed());
            let processed = self.probe_round(remote, round, remaining).await;
            let processed = match processed {
                Err(NotPassed::Fail(detail))
                    if alive.is_empty() && latencies_by_worker.is_empty() =>
                {
                    return Err(format!(
                        "no worker is consuming: no worker heartbeat in Redis, and {detail}"
                    )
                    .into())
                }
                other => other?,
            };
            for (id, latency, worker) in processed {
                tracing::debug!(%id, %worker, latency, "probe processed");
                latencies_by_worker.entry(worker).or_default().push(latency);
            }
            sent += round;
            round = 1;
        }

        let idle: Vec<&String> = alive
            .iter()
            .filter(|instance| !latencies_by_worker.contains_key(*instance))
            .collect();
        let summary = latencies_by_worker
            .iter()
            .map(|(worker, latencies)| match latencies.as_slice() {
                [latency] => format!("{worker} in {latency} ms"),
                _ => format!(
                    "{worker} {} times, slowest {} ms",
                    latencies.len(),
                    latencies.iter().max().copied().unwrap_or_default()
                ),
            })
            .collect::<Vec<_>>()
            .join(", ");
        if !idle.is_empty() {
            return Err(format!(
                "{} alive but took none of {sent} probe jobs ({summary} did); look at \
                 `journalctl -u {}` on its host",
                join_names(&idle),
                worker_paths::UNIT
            )
            .into());
        }
        let seen: BTreeSet<&String> = alive.iter().chain(latencies_by_worker.keys()).collect();
        if seen.len() < expected {
            return Err(format!(
                "{} in the inventory but {} seen: {} in Redis, and {sent} probe jobs \
                 processed by {summary}; `yametee-deploy status`, with the same options, \
                 shows which is missing",
                plural(expected, "worker host"),
                plural(seen.len(), "worker"),
                plural(alive.len(), "heartbeat"),
            )
            .into());
        }
        Ok(format!(
            "{sent} probe job{} processed by {summary}",
            if sent == 1 { "" } else { "s" }
        ))
    }

    /// Lists the worker instances whose heartbeat key is in Redis.
    async fn worker_heartbeats(&self, remote: &Remote) -> Result<BTreeSet<String>, NotPassed> {
        let pattern = format!("{HEARTBEAT_KEY_PREFIX}*");
        let scan = queue::redis_cli(
            self.inventory,
            self.secrets,
            "list the worker heartbeats",
            &["--scan", "--pattern", &pattern],
        );
        let keys = run(remote, &scan).await?;
        Ok(keys
            .lines()
            .filter_map(|key| key.trim().strip_prefix(HEARTBEAT_KEY_PREFIX))
            .map(String::from)
            .collect())
    }

    /// Pushes `count` probe jobs in one command and waits up to `limit` for their results.
    /// Returns, for each job, its id, the milliseconds until its result was seen and the
    /// worker instance that processed it.
    async fn probe_round(
        &self,
        remote: &Remote,
        count: usize,
        limit: Duration,
    ) -> Result<Vec<(String, u128, String)>, NotPassed> {
        let app = &self.inventory.app;
        let jobs: Vec<(String, String)> = (0..count)
            .map(|_| {
                let id = queue::new_job_id("probe");
                let job = queue::job_json(&id, "verify:probe", serde_json::json!({}));
                (id, job)
            })
            .collect();
        let started = Instant::now();
        let mut push = vec!["RPUSH", app.queue.as_str()];
        push.extend(jobs.iter().map(|(_, job)| job.as_str()));
        run(
            remote,
            &queue::redis_cli(self.inventory, self.secrets, "push probe jobs", &push),
        )
        .await?;

        let keys: Vec<String> = jobs
            .iter()
            .map(|(id, _)| format!("{PROBE_KEY_PREFIX}{id}"))
            .collect();
        let mut get = vec!["MGET"];
        get.extend(keys.iter().map(String::as_str));
        let get = queue::redis_cli(self.inventory, self.secrets, "read the probe results", &get);
        let mut results: Vec<Option<(u128, String)>> = vec![None; count];
        // Bounded by the probe timeout; each round trip is one MGET.
        while started.elapsed() < limit {
            let values = run(remote, &get).await?;
            for (slot, value) in results.iter_mut().zip(values.lines()) {
                let value = value.trim();
                if slot.is_none() && !value.is_empty() {
                    let worker = serde_json::from_str::<serde_json::Value>(value)
                        .ok()
                        .and_then(|result| result.get("worker")?.as_str().map(String::from))
                        .unwrap_or_else(|| "a worker".into());
                    *slot = Some((started.elapsed().as_millis(), worker));
                }
            }
            if results.iter().all(Option::is_some) {
                return Ok(jobs
                    .into_iter()
                    .zip(results)
                    .map(|((id, _), result)| {
                        let (latency, worker) = result.expect("all seen");
                        (id, latency, worker)
                    })
                    .collect());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Take the jobs back so that a worker started later does not process stale probes.
        let mut waiting = Vec::new();
        let mut removed = 0;
        for ((id, job), result) in jobs.iter().zip(&results) {
            if result.is_some() {
                continue;
            }
            waiting.push(id.as_str());
            let remove = queue::redis_cli(
                self.inventory,
                self.secrets,
                "remove the probe job",
                &["LREM", &app.queue, "1", job],
            );
            if matches!(run(remote, &remove).await, Ok(count) if count.trim() == "1") {
                removed += 1;
            }
        }
        let removed = match removed {
            0 => String::new(),
            n => format!("; {n} still queued and removed"),
        };
        let (jobs, were) = match waiting.len() {
            1 => ("job", "was"),
            _ => ("jobs", "were"),
        };
        Err(format!(
            "probe {jobs} {} pushed to {} {were} not processed within {} s{removed}; look at \
             `journalctl -u {}` on the worker hosts",
            waiting.join(", "),
            app.queue,
            self.probe_timeout.as_secs(),
            worker_paths::UNIT
        )
        .into())
    }
}

/// Counts `thing` for a message: `1 worker host`, `2 worker hosts`.
fn plural(count: usize, thing: &str) -> String {
    match count {
        1 => format!("1 {thing}"),
        _ => format!("{count} {thing}s"),
    }
}

/// Joins names for a message: `a`, `a and b`, `a, b and c`.
fn join_names(names: &[&String]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!(
            "{} and {last}",
            rest.iter()
                .map(|name| name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn units_of(host: &Host) -> Vec<&'static str> {
    let mut units = vec!["ssh.service"];
    if host.has_role(Role::Postgres) {
        units.push(POSTGRES_UNIT);
    }
    if host.has_role(Role::Redis) {
        units.push(REDIS_UNIT);
    }
    if host.has_role(Role::Worker) {
        units.push(worker_paths::UNIT);
    }
    units
}

async fn unit_running(remote: &Remote, unit: &str) -> CheckOutcome {
    let active = remote
        .output(&RemoteCommand::new("systemctl").args(["is-active", unit]))
        .await
        .map_err(|e| error_chain(&e))?;
    let enabled = remote
        .output(&RemoteCommand::new("systemctl").args(["is-enabled", unit]))
        .await
        .map_err(|e| error_chain(&e))?;
    let (active, enabled) = (
        active.stdout.trim().to_string(),
        enabled.stdout.trim().to_string(),
    );
    if active == "active" && enabled == "enabled" {
        Ok(format!("{unit} active and enabled"))
    } else {
        Err(format!(
            "{unit} is {} and {}; expected active and enabled; see `sudo systemctl status {unit}` \
             and `sudo journalctl -u {unit} -n 50`; apply starts and enables it",
            if active.is_empty() {
                "unknown"
            } else {
                &active
            },
            if enabled.is_empty() {
                "not installed"
            } else {
                &enabled
            },
        )
        .into())
    }
}

async fn listening(remote: &Remote, host: &Host, port: u16) -> CheckOutcome {
    let output = run(remote, &RemoteCommand::new("ss").args(["-tlnH"])).await?;
    let wanted = format!("{}:{port}", host.address);
    let found = output
        .lines()
        .any(|line| line.split_whitespace().nth(3) == Some(wanted.as_str()));
    if found {
        Ok(format!("listening on {wanted}"))
    } else {
        Err(format!("nothing listens on {wanted}; see `sudo ss -tlnp` on the host").into())
    }
}

/// Passes when a TCP connection from `remote` to `address:port` does not open.
async fn blocked(remote: &Remote, address: String, port: u16) -> CheckOutcome {
    let script = r#"exec timeout "$3" bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2""#;
    let port_text = port.to_string();
    let command = RemoteCommand::script(
        &format!("connect to {address}:{port}"),
        script,
        &[&address, &port_text, BLOCKED_PROBE_SECS],
    );
    let output = remote
        .output(&command)
        .await
        .map_err(|error| error_chain(&error))?;
    if output.success() {
        Err(format!("a connection to {address}:{port} opened; the firewall must block it").into())
    } else {
        Ok(format!("connection to {address}:{port} blocked"))
    }
}

async fn run(remote: &Remote, command: &RemoteCommand) -> Result<String, String> {
    remote
        .run(command)
        .await
        .map_err(|error: SshError| error_chain(&error))
}

fn pass(id: &str, detail: String, started: Instant) -> CheckResult {
    CheckResult {
        id: id.into(),
        status: Status::Pass,
        detail,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

fn fail(id: &str, detail: String, started: Instant) -> CheckResult {
    CheckResult {
        id: id.into(),
        status: Status::Fail,
        detail,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_patterns_select_ids() {
        let only = vec!["worker".to_string(), "queue.depth".to_string()];
        assert!(check_selected("worker.memory", &only));
        assert!(check_selected("queue.depth", &only));
        assert!(!check_selected("queue.depth-x", &only));
        assert!(!check_selected("web.redis-ping", &only));
        assert!(!check_selected("workers.x", &only));
        assert!(check_selected("anything", &[]));
        assert!(check_selected(
            "firewall.rules",
            &["firewall.*".to_string()]
        ));
    }

    #[test]
    fn startup_lines_name_the_worker() {
        let lines = startup_lines("yametee-worker");
        assert_eq!(lines[3], "Worker yametee-worker started");
        assert_eq!(lines[4], "Worker yametee-worker ready and waiting for jobs");
    }
}
