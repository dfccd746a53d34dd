//! Results for people (aligned text), for programs (one JSON document) and for CI systems
//! (JUnit XML). Everything here is written to stdout by the caller.

use std::fmt::Write as _;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
use serde::Serialize;

use crate::apply::{HostReport, Outcome};
use crate::deploy::HostPlanReport;
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
        Format::Json => json(&PlanDocument { ok, in_sync, hosts: reports }),
        Format::Junit => junit_plan(reports),
        Format::Human => {
            let mut text = String::new();
            for report in reports {
                let _ = match (&report.error, report.changes.len()) {
                    (Some(error), _) => writeln!(text, "{} ({}): error: {error}", report.name, report.roles.join(",")),
                    (None, 0) => writeln!(text, "{} ({}): in sync", report.name, report.roles.join(",")),
                    (None, count) => writeln!(
                        text,
                        "{} ({}): {count} change{}",
                        report.name,
                        report.roles.join(","),
                        if count == 1 { "" } else { "s" }
                    ),
                };
                for change in &report.changes {
                    let _ = writeln!(text, "  {:<9} {:<8} {}", change.action, change.kind, change.target);
                }
                for diff in &report.diffs {
                    for line in diff.lines() {
                        let _ = writeln!(text, "    {line}");
                    }
                }
            }
            let changed = reports.iter().filter(|report| !report.changes.is_empty()).count();
            let _ = writeln!(text, "{changed} of {} hosts have changes pending", reports.len());
            text
        }
    }
}

pub fn apply(reports: &[HostReport], format: Format) -> String {
    let ok = reports.iter().all(|report| report.outcome.is_success());
    let changed = reports.iter().any(|report| !report.changes.is_empty());
    match format {
        Format::Json => json(&ApplyDocument { ok, changed, hosts: reports }),
        Format::Junit => junit_apply(reports),
        Format::Human => {
            let mut text = String::new();
            let _ = writeln!(text, "{:<12} {:<16} {:<12} {:>7}  RESTARTED", "HOST", "ROLES", "OUTCOME", "CHANGES");
            for report in reports {
                let restarted = if report.restarted.is_empty() { "-".to_string() } else { report.restarted.join(", ") };
                let _ = writeln!(
                    text,
                    "{:<12} {:<16} {:<12} {:>7}  {restarted}",
                    report.name,
                    report.roles.join(","),
                    outcome_name(report.outcome),
                    report.changes.len()
                );
            }
            for report in reports {
                if report.changes.is_empty() && report.error.is_none() {
                    continue;
                }
                let _ = writeln!(text, "\n{}:", report.name);
                for change in &report.changes {
                    let _ = writeln!(text, "  {:<9} {:<8} {}", change.action, change.kind, change.target);
                }
                if let Some(error) = &report.error {
                    let _ = writeln!(text, "  error: {error}");
                }
            }
            let failed = reports.iter().filter(|report| !report.outcome.is_success()).count();
            let _ = writeln!(
                text,
                "\n{} hosts: {} changed, {} unchanged, {failed} failed",
                reports.len(),
                reports.iter().filter(|report| report.outcome == Outcome::Changed).count(),
                reports.iter().filter(|report| report.outcome == Outcome::Unchanged).count(),
            );
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
            let _ = writeln!(text, "{:<10} {:<26} {:<6} {:>8}  DETAIL", "HOST", "CHECK", "STATUS", "TIME");
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
    let mut junit = Report::new("yametee-deploy apply");
    let mut suite = TestSuite::new("apply");
    for report in reports {
        let status = if report.outcome.is_success() {
            TestCaseStatus::success()
        } else {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
            status.set_message(report.error.clone().unwrap_or_else(|| outcome_name(report.outcome).into()));
            status
        };
        let mut case = TestCase::new(report.name.as_str(), status);
        let changes: Vec<String> = report.changes.iter().map(|c| format!("{} {} {}", c.action, c.kind, c.target)).collect();
        case.set_system_out(changes.join("\n"));
        suite.add_test_case(case);
    }
    junit.add_test_suite(suite);
    junit_text(&junit)
}

fn junit_plan(reports: &[HostPlanReport]) -> String {
    let mut junit = Report::new("yametee-deploy plan");
    let mut suite = TestSuite::new("plan");
    for report in reports {
        let status = match &report.error {
            None => TestCaseStatus::success(),
            Some(error) => {
                let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
                status.set_message(error.as_str());
                status
            }
        };
        let mut case = TestCase::new(report.name.as_str(), status);
        let changes: Vec<String> = report.changes.iter().map(|c| format!("{} {} {}", c.action, c.kind, c.target)).collect();
        case.set_system_out(changes.join("\n"));
        suite.add_test_case(case);
    }
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
