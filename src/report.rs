//! Results for people (aligned text), for programs (one JSON document) and for CI systems
//! (JUnit XML). Everything here is written to stdout by the caller.

use std::fmt::Write as _;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
use serde::Serialize;

use crate::apply::{HostReport, Outcome};
use crate::deploy::HostPlanReport;
use crate::inventory::{Inventory, SshSettings};
use crate::plan::Change;
use crate::verify::{Status, VerifyReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
    Junit,
}

#[derive(Serialize)]
struct PlanDocument<'a> {
    ok: bool,
    in_sync: bool,
    hosts: &'a [HostPlanReport],
}

#[derive(Serialize)]
struct ApplyDocument<'a> {
    ok: bool,
    changed: bool,
    hosts: &'a [HostReport],
}

pub fn plan(reports: &[HostPlanReport], format: Format) -> String {
    let ok = reports.iter().all(|report| report.error.is_none());
    let in_sync = reports.iter().all(|report| report.changes.is_empty());
    match format {
        Format::Json => json(&PlanDocument {
            ok,
            in_sync,
            hosts: reports,
        }),
        Format::Junit => junit_plan(reports),
        Format::Human => {
            let mut text = String::new();
            for report in reports {
                let _ = match (&report.error, report.changes.len()) {
                    (Some(error), _) => writeln!(
                        text,
                        "{} ({}): error: {error}",
                        report.name,
                        report.roles.join(",")
                    ),
                    (None, 0) => writeln!(
                        text,
                        "{} ({}): in sync",
                        report.name,
                        report.roles.join(",")
                    ),
                    (None, count) => writeln!(
                        text,
                        "{} ({}): {count} change{}",
                        report.name,
                        report.roles.join(","),
                        if count == 1 { "" } else { "s" }
                    ),
                };
                write_changes(&mut text, &report.changes);
                for diff in &report.diffs {
                    for line in diff.lines() {
                        let _ = writeln!(text, "    {line}");
                    }
                }
            }
            let changed = reports
                .iter()
                .filter(|report| !report.changes.is_empty())
                .count();
            let failed = reports
                .iter()
                .filter(|report| report.error.is_some())
                .count();
            let _ = write!(
                text,
                "{changed} of {} hosts have changes pending",
                reports.len()
            );
            let _ = match failed {
                0 => writeln!(text),
                _ => writeln!(text, "; {failed} could not be planned"),
            };
            text
        }
    }
}

pub fn apply(reports: &[HostReport], format: Format) -> String {
    let ok = reports.iter().all(|report| report.outcome.is_success());
    let changed = reports.iter().any(|report| !report.changes.is_empty());
    match format {
        Format::Json => json(&ApplyDocument {
            ok,
            changed,
            hosts: reports,
        }),
        Format::Junit => junit_apply(reports),
        Format::Human => {
            let mut text = String::new();
            let _ = writeln!(
                text,
                "{:<12} {:<16} {:<12} {:>7} {:>8}  RESTARTED",
                "HOST", "ROLES", "OUTCOME", "CHANGES", "TIME"
            );
            for report in reports {
                let restarted = if report.restarted.is_empty() {
                    "-".to_string()
                } else {
                    report.restarted.join(", ")
                };
                let _ = writeln!(
                    text,
                    "{:<12} {:<16} {:<12} {:>7} {:>6.1} s  {restarted}",
                    report.name,
                    report.roles.join(","),
                    outcome_name(report.outcome),
                    report.changes.len(),
                    report.duration_ms as f64 / 1000.0
                );
            }
            for report in reports {
                if report.changes.is_empty() && report.error.is_none() {
                    continue;
                }
                let _ = writeln!(text, "\n{}:", report.name);
                write_changes(&mut text, &report.changes);
                if let Some(error) = &report.error {
                    let _ = writeln!(text, "  error: {error}");
                }
            }
            let count = |outcome: Outcome| {
                reports
                    .iter()
                    .filter(|report| report.outcome == outcome)
                    .count()
            };
            let failed = count(Outcome::Failed) + count(Outcome::RolledBack);
            let _ = write!(
                text,
                "\n{} hosts: {} changed, {} unchanged, {failed} failed",
                reports.len(),
                count(Outcome::Changed),
                count(Outcome::Unchanged),
            );
            let skipped = count(Outcome::Skipped);
            if skipped > 0 {
                let _ = write!(text, ", {skipped} skipped");
            }
            text.push('\n');
            text
        }
    }
}

pub fn verify(report: &VerifyReport, format: Format) -> String {
    match format {
        Format::Json => json(report),
        Format::Junit => junit_verify(report),
        Format::Human => {
            let mut text = String::new();
            let _ = writeln!(
                text,
                "{:<10} {:<26} {:<6} {:>8}  DETAIL",
                "HOST", "CHECK", "STATUS", "TIME"
            );
            for host in &report.hosts {
                for check in &host.checks {
                    let status = match check.status {
                        Status::Pass => "pass",
                        Status::Fail => "FAIL",
                        Status::Skip => "skip",
                    };
                    let _ = writeln!(
                        text,
                        "{:<10} {:<26} {:<6} {:>5} ms  {}",
                        host.name, check.id, status, check.duration_ms, check.detail
                    );
                }
            }
            let _ = writeln!(
                text,
                "\n{} passed, {} failed, {} skipped",
                report.count(Status::Pass),
                report.count(Status::Fail),
                report.count(Status::Skip)
            );
            text
        }
    }
}

/// Writes one aligned line per change: action, kind, target.
fn write_changes(text: &mut String, changes: &[Change]) {
    let action_width = changes
        .iter()
        .map(|change| change.action.len())
        .max()
        .unwrap_or(0);
    let kind_width = changes
        .iter()
        .map(|change| change.kind.len())
        .max()
        .unwrap_or(0);
    for change in changes {
        let _ = writeln!(
            text,
            "  {:<action_width$}  {:<kind_width$}  {}",
            change.action, change.kind, change.target
        );
    }
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Unchanged => "unchanged",
        Outcome::Changed => "changed",
        Outcome::Failed => "FAILED",
        Outcome::RolledBack => "ROLLED-BACK",
        Outcome::Skipped => "skipped",
    }
}

fn json<T: Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("reports serialize to JSON");
    text.push('\n');
    text
}

fn junit_verify(report: &VerifyReport) -> String {
    let mut junit = Report::new("yametee-deploy verify");
    for host in &report.hosts {
        let mut suite = TestSuite::new(host.name.as_str());
        for check in &host.checks {
            let status = match check.status {
                Status::Pass => TestCaseStatus::success(),
                Status::Fail => {
                    let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    status.set_message(check.detail.as_str());
                    status
                }
                Status::Skip => {
                    let mut status = TestCaseStatus::skipped();
                    status.set_message(check.detail.as_str());
                    status
                }
            };
            let mut case = TestCase::new(check.id.as_str(), status);
            case.set_classname(format!("{}.{}", host.role, host.name));
            case.set_time(std::time::Duration::from_millis(check.duration_ms));
            if check.status == Status::Pass {
                case.set_system_out(check.detail.as_str());
            }
            suite.add_test_case(case);
        }
        junit.add_test_suite(suite);
    }
    junit_text(&junit)
}

fn junit_apply(reports: &[HostReport]) -> String {
    let cases = reports.iter().map(|report| {
        let failure = (!report.outcome.is_success()).then(|| {
            let message = report
                .error
                .clone()
                .unwrap_or_else(|| outcome_name(report.outcome).into());
            (NonSuccessKind::Failure, message)
        });
        (report.name.as_str(), failure, report.changes.as_slice())
    });
    junit_per_host("apply", cases)
}

fn junit_plan(reports: &[HostPlanReport]) -> String {
    let cases = reports.iter().map(|report| {
        let failure = report
            .error
            .clone()
            .map(|error| (NonSuccessKind::Error, error));
        (report.name.as_str(), failure, report.changes.as_slice())
    });
    junit_per_host("plan", cases)
}

/// One test case per host, failed where the host has a failure, with its changes as output.
fn junit_per_host<'a>(
    command: &str,
    cases: impl Iterator<Item = (&'a str, Option<(NonSuccessKind, String)>, &'a [Change])>,
) -> String {
    let mut junit = Report::new(format!("yametee-deploy {command}"));
    let mut suite = TestSuite::new(command);
    for (host, failure, changes) in cases {
        let status = match failure {
            None => TestCaseStatus::success(),
            Some((kind, message)) => {
                let mut status = TestCaseStatus::non_success(kind);
                status.set_message(message);
                status
            }
        };
        let mut case = TestCase::new(host, status);
        let lines: Vec<String> = changes
            .iter()
            .map(|c| format!("{} {} {}", c.action, c.kind, c.target))
            .collect();
        case.set_system_out(lines.join("\n"));
        suite.add_test_case(case);
    }
    junit.add_test_suite(suite);
    junit_text(&junit)
}

/// Formats the validated inventory for people: one aligned line per host, then the application
/// settings with defaults filled in. Secrets appear as the variable or file they are read
/// from, never as values.
pub fn inventory_summary(inventory: &Inventory) -> String {
    let rows: Vec<[String; 4]> = inventory
        .hosts
        .iter()
        .map(|host| {
            let roles: Vec<&str> = host.roles.iter().map(|role| role.as_str()).collect();
            [
                host.name.clone(),
                host.address.to_string(),
                roles.join(","),
                ssh_summary(&host.ssh),
            ]
        })
        .collect();
    let header = ["HOST", "ADDRESS", "ROLES", "SSH"].map(String::from);
    let mut widths = [0; 3];
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut text = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let _ = writeln!(
            text,
            "{:<name_width$}  {:<address_width$}  {:<roles_width$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            name_width = widths[0],
            address_width = widths[1],
            roles_width = widths[2]
        );
    }

    let app = &inventory.app;
    let database = &app.database;
    let worker = &app.worker;
    let thresholds = &app.thresholds;
    let settings = [
        (
            "database",
            format!(
                "{} owned by {}, port {}, PostgreSQL {}, password from {}",
                database.name, database.user, database.port, database.version, database.password
            ),
        ),
        (
            "redis",
            format!(
                "port {}, maxmemory {}, password from {}",
                app.redis.port,
                app.redis.maxmemory.as_deref().unwrap_or("Redis's default"),
                app.redis.password
            ),
        ),
        ("queue", app.queue.clone()),
        (
            "worker",
            format!(
                "{}, concurrency {}, ready within {} s, memory budget {} MB",
                worker.name, worker.concurrency, worker.ready_timeout_secs, worker.memory_budget_mb
            ),
        ),
        (
            "web",
            match &app.web.start_command {
                Some(command) => format!(
                    "started with `{command}` in {}",
                    app.web
                        .working_directory
                        .as_deref()
                        .unwrap_or("the unit's default directory")
                ),
                None => "no start command, so no web unit is installed".into(),
            },
        ),
        (
            "smtp",
            match &app.smtp {
                Some(smtp) => format!(
                    "relay URL from {}, sender {}",
                    smtp.url,
                    smtp.from.as_deref().unwrap_or("<worker name>@<host name>")
                ),
                None => {
                    "no relay, so email:send jobs wait in retries, then go to the dead-letter list"
                        .into()
                }
            },
        ),
        (
            "thresholds",
            format!(
                "pending {}, in-flight {}, retry {}, dead {}",
                thresholds.pending, thresholds.in_flight, thresholds.retry, thresholds.dead
            ),
        ),
    ];
    text.push('\n');
    for (name, value) in settings {
        let _ = writeln!(text, "{name:<10}  {value}");
    }
    text
}

fn ssh_summary(ssh: &SshSettings) -> String {
    let mut text = format!("{}, port {}", ssh.user, ssh.port);
    if ssh.sudo {
        text.push_str(", sudo");
    }
    if let Some(identity) = &ssh.identity {
        let _ = write!(text, ", key {}", identity.display());
    }
    if let Some(known_hosts) = &ssh.known_hosts {
        let _ = write!(text, ", known_hosts {}", known_hosts.display());
    }
    if let Some(algorithms) = &ssh.key_exchange {
        let _ = write!(text, ", key exchange {algorithms}");
    }
    text
}

/// A JUnit report with one failed test case, for a command that stopped before it could
/// produce results.
pub fn fatal_junit(message: &str) -> String {
    let mut junit = Report::new("yametee-deploy");
    let mut suite = TestSuite::new("yametee-deploy");
    let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
    status.set_message(message);
    suite.add_test_case(TestCase::new("run", status));
    junit.add_test_suite(suite);
    junit_text(&junit)
}

fn junit_text(report: &Report) -> String {
    let mut text = report.to_string().expect("JUnit reports serialize");
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{CheckResult, HostResult};

    fn sample() -> VerifyReport {
        let check = |id: &str, status: Status| CheckResult {
            id: id.into(),
            status,
            detail: format!("{id} detail"),
            duration_ms: 12,
        };
        VerifyReport {
            ok: false,
            hosts: vec![HostResult {
                name: "worker".into(),
                role: "worker".into(),
                roles: vec!["worker".into()],
                checks: vec![
                    check("ssh.reachable", Status::Pass),
                    check("worker.memory", Status::Fail),
                ],
            }],
        }
    }

    #[test]
    fn verify_json_has_interface_fields() {
        let document: serde_json::Value =
            serde_json::from_str(&verify(&sample(), Format::Json)).unwrap();
        assert_eq!(document["ok"], false);
        let host = &document["hosts"][0];
        assert_eq!(host["name"], "worker");
        assert_eq!(host["role"], "worker");
        let check = &host["checks"][1];
        assert_eq!(check["id"], "worker.memory");
        assert_eq!(check["status"], "fail");
        assert_eq!(check["detail"], "worker.memory detail");
        assert_eq!(check["duration_ms"], 12);
    }

    #[test]
    fn verify_junit_has_case_per_check() {
        let xml = verify(&sample(), Format::Junit);
        assert!(
            xml.contains(r#"<testsuite name="worker" tests="2""#),
            "{xml}"
        );
        assert!(xml.contains(r#"<testcase name="ssh.reachable""#), "{xml}");
        assert!(
            xml.contains(r#"<failure message="worker.memory detail""#),
            "{xml}"
        );
    }

    #[test]
    fn inventory_summary_shows_references_not_secrets() {
        let text = "app:\n  database: {name: db, user: app, password: {env: PG_PASSWORD}}\n  \
                    redis: {password: {file: /run/secrets/redis}}\nhosts:\n  data: {address: \
                    10.0.0.2, roles: [postgres, redis], ssh: {port: 2222}}\n";
        let inventory = crate::inventory::parse_inventory(text).unwrap();
        let summary = inventory_summary(&inventory);
        assert!(
            summary.contains("data  10.0.0.2  postgres,redis  deploy, port 2222, sudo\n"),
            "{summary}"
        );
        assert!(
            summary.contains("password from environment variable PG_PASSWORD"),
            "{summary}"
        );
        assert!(
            summary.contains("password from file /run/secrets/redis"),
            "{summary}"
        );
        assert!(summary.contains("queue       yametee:jobs\n"), "{summary}");
    }

    #[test]
    fn verify_table_ends_with_counts() {
        let text = verify(&sample(), Format::Human);
        assert!(text.contains("FAIL"), "{text}");
        assert!(text.ends_with("1 passed, 1 failed, 0 skipped\n"), "{text}");
    }
}
