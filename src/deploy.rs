//! Runs plan and apply across the inventory. Hosts are worked in dependency tiers, PostgreSQL
//! and Redis before their clients. The hosts of one tier run in parallel with a bounded number
//! of connections, and a failed host stops only the tiers that depend on it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::future::join_all;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::apply::{self, HostReport, Outcome};
use crate::facts;
use crate::inventory::{Host, Inventory, Role};
use crate::plan::{self, Change, HostPlan, WorkerBinary};
use crate::postgres;
use crate::render::{worker_paths, Renderer};
use crate::secrets::Secrets;
use crate::ssh::{Destination, Remote, SshOverrides};

/// Default for `--parallel`: the most hosts worked on at once.
pub const DEFAULT_PARALLEL_HOSTS: usize = 8;

/// A host's open connection and plan, or why they could not be had.
type Prepared = Result<(Remote, HostPlan), String>;

/// Everything a run needs, resolved before the first connection.
pub struct Deployment {
    pub inventory: Inventory,
    pub secrets: Secrets,
    pub ssh: SshOverrides,
    pub worker: Option<WorkerBinary>,
    pub renderer: Renderer,
    /// Names of the hosts this run works on (`--limit`); the others are only rendered from.
    pub targets: Vec<String>,
    /// Most hosts worked on at once (`--parallel`).
    pub parallel: usize,
}

/// The plan of one host, as shown by `plan`.
#[derive(Debug, Clone, Serialize)]
pub struct HostPlanReport {
    pub name: String,
    pub roles: Vec<String>,
    pub changes: Vec<Change>,
    pub diffs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Deployment {
    /// The hosts this run works on, in inventory order.
    pub fn target_hosts(&self) -> impl Iterator<Item = &Host> {
        self.inventory
            .hosts
            .iter()
            .filter(|host| self.targets.contains(&host.name))
    }

    fn worker_for(&self, host: &Host) -> Option<&WorkerBinary> {
        if host.has_role(Role::Worker) {
            self.worker.as_ref()
        } else {
            None
        }
    }

    /// Opens the SSH connection to `host`.
    async fn connect(&self, host: &Host) -> Result<Remote, String> {
        let remote = Remote::connect(Destination::for_host(host, &self.ssh))
            .await
            .map_err(|error| error_chain(&error))?;
        tracing::info!(host = %host.name, "connected");
        Ok(remote)
    }

    /// Renders the desired state of `host`, reads its current state and plans.
    async fn plan_connected(&self, remote: &Remote, host: &Host) -> Result<HostPlan, String> {
        let desired = self
            .renderer
            .render_host(&self.inventory, host, &self.secrets)
            .map_err(|error| error_chain(&error))?;
        let is_postgres = self.inventory.postgres_host().name == host.name;
        let database = async {
            if is_postgres {
                postgres::ensure_access(remote, &self.inventory, &self.secrets, true).await
            } else {
                Ok(Vec::new())
            }
        };
        let (facts, database_changes) = tokio::join!(facts::gather(remote, &desired), database);
        let facts = facts.map_err(|error| error_chain(&error))?;
        let worker = self.worker_for(host);
        if let Some(reason) = worker.and_then(|worker| worker.incompatibility(&facts.platform)) {
            return Err(format!(
                "host {} cannot run the worker binary: {reason}",
                host.name
            ));
        }
        let mut plan = plan::plan_host(&desired, &facts, worker);
        let uploads = plan
            .steps
            .iter()
            .any(|step| matches!(step, plan::Step::InstallRelease { .. }));
        if let (true, Some(worker), Some(available)) = (uploads, worker, facts.disk_available) {
            if available < worker.space_needed() {
                return Err(format!(
                    "host {} has {} MiB free on /opt; the worker release needs {} MiB",
                    host.name,
                    available >> 20,
                    worker.space_needed() >> 20
                ));
            }
        }
        plan.database_changes = database_changes.map_err(|error| error_chain(&error))?;
        Ok(plan)
    }

    /// Plans every host without changing anything.
    pub async fn plan(&self) -> Vec<HostPlanReport> {
        let limit = Arc::new(Semaphore::new(self.parallel));
        let reports = self.target_hosts().map(|host| {
            let limit = limit.clone();
            async move {
                let _permit = limit.acquire().await.expect("semaphore is never closed");
                self.plan_one(host).await
            }
        });
        join_all(reports).await
    }

    async fn plan_one(&self, host: &Host) -> HostPlanReport {
        let mut report = HostPlanReport {
            name: host.name.clone(),
            roles: role_names(host),
            changes: Vec::new(),
            diffs: Vec::new(),
            error: None,
        };
        let remote = match self.connect(host).await {
            Ok(remote) => remote,
            Err(error) => {
                report.error = Some(self.secrets.redact(&error));
                return report;
            }
        };
        match self.plan_connected(&remote, host).await {
            Ok(plan) => {
                report.changes = plan.changes();
                report.diffs = plan.diffs(&self.secrets);
                tracing::info!(host = %host.name, changes = report.changes.len(), "planned");
            }
            Err(error) => report.error = Some(self.secrets.redact(&error)),
        }
        remote.close().await;
        report
    }

    /// Applies every host, tier by tier. Worker hosts whose running worker would restart
    /// go at most `max_unavailable` at a time, so the queue keeps draining. Once one of them
    /// fails, those not started yet are left as they are.
    pub async fn apply(&self, max_unavailable: usize) -> Vec<HostReport> {
        let started = std::time::Instant::now();
        // Every host is connected to and planned at once: the SSH handshakes and the reading
        // of each host's state are most of a run's fixed cost, and a later tier's plan does not
        // depend on what an earlier tier's apply changes on other hosts.
        let limit = Arc::new(Semaphore::new(self.parallel));
        let prepared = join_all(self.target_hosts().map(|host| {
            let limit = limit.clone();
            async move {
                let _permit = limit.acquire().await.expect("semaphore is never closed");
                (host.name.clone(), self.connect_and_plan(host).await)
            }
        }))
        .await;
        let mut connections: HashMap<String, Prepared> = prepared.into_iter().collect();

        let mut tiers: BTreeMap<u8, Vec<&Host>> = BTreeMap::new();
        for host in self.target_hosts() {
            tiers.entry(host.tier()).or_default().push(host);
        }

        let rollout = Semaphore::new(max_unavailable);
        let rollout_failed: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
        let mut reports: Vec<HostReport> = Vec::new();
        let mut failed: Vec<String> = Vec::new();
        for hosts in tiers.values() {
            if !failed.is_empty() {
                for host in hosts {
                    if let Some(Ok((remote, _))) = connections.remove(&host.name) {
                        remote.close().await;
                    }
                    reports.push(skipped_report(
                        host,
                        format!(
                            "skipped because host{} {} failed and this host depends on it",
                            if failed.len() == 1 { "" } else { "s" },
                            failed.join(", ")
                        ),
                    ));
                }
                continue;
            }
            let tier_reports = join_all(hosts.iter().map(|host| {
                let connection = connections
                    .remove(&host.name)
                    .expect("every target host was connected or failed to connect");
                let limit = limit.clone();
                let (rollout, rollout_failed) = (&rollout, &rollout_failed);
                async move {
                    let rolling = matches!(&connection, Ok((_, plan)) if restarts_worker(plan));
                    let _turn = if rolling {
                        Some(rollout.acquire().await.expect("semaphore is never closed"))
                    } else {
                        None
                    };
                    let stopped_by = rollout_failed.lock().expect("not poisoned").clone();
                    if let (true, Some(failed_host)) = (rolling, stopped_by) {
                        if let Ok((remote, _)) = connection {
                            remote.close().await;
                        }
                        let mut report = skipped_report(
                            host,
                            format!(
                                "not deployed: the rolling restart stopped after host \
                                 {failed_host} failed; this host keeps its running worker"
                            ),
                        );
                        report.duration_ms = started.elapsed().as_millis() as u64;
                        return report;
                    }
                    let _permit = limit.acquire().await.expect("semaphore is never closed");
                    let mut report = self.apply_one(host, connection).await;
                    report.duration_ms = started.elapsed().as_millis() as u64;
                    if rolling && !report.outcome.is_success() {
                        rollout_failed
                            .lock()
                            .expect("not poisoned")
                            .get_or_insert_with(|| host.name.clone());
                    }
                    report
                }
            }))
            .await;
            for report in tier_reports {
                if !report.outcome.is_success() {
                    failed.push(report.name.clone());
                }
                reports.push(report);
            }
        }
        // Report hosts in inventory order whatever order the tiers ran in.
        let order: Vec<&str> = self
            .inventory
            .hosts
            .iter()
            .map(|host| host.name.as_str())
            .collect();
        reports.sort_by_key(|report| order.iter().position(|name| *name == report.name));
        reports
    }

    /// Connects to `host` and plans it; on a planning error the connection is closed.
    async fn connect_and_plan(&self, host: &Host) -> Prepared {
        let remote = self.connect(host).await?;
        match self.plan_connected(&remote, host).await {
            Ok(plan) => Ok((remote, plan)),
            Err(error) => {
                remote.close().await;
                Err(error)
            }
        }
    }

    async fn apply_one(&self, host: &Host, prepared: Prepared) -> HostReport {
        let mut report = empty_report(host);
        let (remote, plan) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                report.outcome = Outcome::Failed;
                report.error = Some(self.secrets.redact(&error));
                return report;
            }
        };

        let worker = self.worker_for(host);
        let result = apply::apply_host(
            &remote,
            &self.inventory,
            &plan,
            &self.secrets,
            worker,
            &mut report,
        )
        .await;
        remote.close().await;

        match result {
            Ok(()) => {
                report.outcome = if report.changes.is_empty() {
                    Outcome::Unchanged
                } else {
                    Outcome::Changed
                };
                tracing::info!(host = %host.name, changes = report.changes.len(), "applied");
            }
            Err(error) => {
                if report.outcome != Outcome::RolledBack {
                    report.outcome = Outcome::Failed;
                }
                let message = self.secrets.redact(&error_chain(&error));
                tracing::error!(host = %host.name, "{message}");
                report.error = Some(message);
            }
        }
        report
    }
}

/// Tells whether `plan` restarts a worker that is running now, taking it off the queue.
fn restarts_worker(plan: &HostPlan) -> bool {
    plan.steps
        .iter()
        .any(|step| matches!(step, plan::Step::Restart(unit) if unit == worker_paths::UNIT))
}

/// Builds the report of a host left untouched, with the reason.
fn skipped_report(host: &Host, reason: String) -> HostReport {
    let mut report = empty_report(host);
    report.outcome = Outcome::Skipped;
    report.error = Some(reason);
    report
}

fn empty_report(host: &Host) -> HostReport {
    HostReport {
        name: host.name.clone(),
        roles: role_names(host),
        outcome: Outcome::Unchanged,
        changes: Vec::new(),
        restarted: Vec::new(),
        error: None,
        duration_ms: 0,
    }
}

pub fn role_names(host: &Host) -> Vec<String> {
    host.roles
        .iter()
        .map(|role| role.as_str().to_string())
        .collect()
}

/// Formats an error and its causes on one line: "a: b: c".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
