//! The status report and its two renderings: a table that fits one screen, and JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::snapshot::{QueueSnapshot, WorkerInstance};
use crate::queue::rfc3339;

/// Everything one refresh of `status` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReport {
    /// True when Redis was read, every worker instance is alive and every worker host was
    /// reached.
    pub ok: bool,
    /// The queue's state; `None` when Redis could not be read.
    #[serde(flatten)]
    pub snapshot: Option<QueueSnapshot>,
    /// The inventory's worker hosts and the end of each one's journal.
    pub hosts: Vec<WorkerHost>,
    /// Reason Redis could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A worker host of the inventory, as `status` saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerHost {
    pub name: String,
    /// The worker instance this host runs, `<worker name>@<kernel host name>`; `None` while
    /// the host cannot be reached.
    pub instance: Option<String>,
    pub reachable: bool,
    /// The last lines of the worker unit's journal, oldest first.
    pub journal: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StatusReport {
    /// Builds a report and decides `ok` from its parts.
    pub fn new(snapshot: Result<QueueSnapshot, String>, hosts: Vec<WorkerHost>) -> StatusReport {
        let (snapshot, error) = match snapshot {
            Ok(snapshot) => (Some(snapshot), None),
            Err(error) => (None, Some(error)),
        };
        let workers_alive = snapshot
            .as_ref()
            .is_some_and(|snapshot| snapshot.workers.iter().all(|worker| worker.alive));
        let hosts_reachable = hosts.iter().all(|host| host.reachable);
        StatusReport {
            ok: workers_alive && hosts_reachable,
            snapshot,
            hosts,
            error,
        }
    }
}

/// Text styles of the human rendering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// Green "alive" and red "dead" or "unreachable", with ANSI escapes.
    pub colour: bool,
    /// Maximum line length, in characters. Longer lines are cut with "…", and `None` keeps
    /// them whole.
    pub width: Option<usize>,
}

impl Style {
    pub const PLAIN: Style = Style {
        colour: false,
        width: None,
    };
}

/// Renders `report` as a table that fits one screen with up to a few worker hosts.
pub fn human(report: &StatusReport, style: Style) -> String {
    let mut out = String::new();
    match &report.snapshot {
        Some(snapshot) => write_snapshot(&mut out, snapshot, &report.hosts, style),
        None => {
            let error = report.error.as_deref().unwrap_or("unknown error");
            let _ = writeln!(
                out,
                "{} {error}",
                paint("redis unreadable:", Paint::Bad, style)
            );
        }
    }

    for host in &report.hosts {
        out.push('\n');
        match (&host.error, host.reachable) {
            (Some(error), false) => {
                let _ = writeln!(
                    out,
                    "{}: {} {error}",
                    host.name,
                    paint("unreachable:", Paint::Bad, style)
                );
            }
            (error, _) => {
                let _ = writeln!(
                    out,
                    "journal of {} (last {} line{})",
                    host.name,
                    host.journal.len(),
                    if host.journal.len() == 1 { "" } else { "s" }
                );
                for line in &host.journal {
                    let _ = writeln!(out, "  {line}");
                }
                if let Some(error) = error {
                    let _ = writeln!(out, "  {} {error}", paint("error:", Paint::Bad, style));
                }
            }
        }
    }

    match style.width {
        Some(width) => out
            .lines()
            .map(|line| cut(line, width))
            .map(|line| line + "\n")
            .collect(),
        None => out,
    }
}

fn write_snapshot(out: &mut String, snapshot: &QueueSnapshot, hosts: &[WorkerHost], style: Style) {
    let jobs = &snapshot.jobs;
    let _ = writeln!(
        out,
        "{} at {} (Redis time)",
        snapshot.queue,
        rfc3339(std::time::Duration::from_millis(
            snapshot.time_unix_ms.max(0) as u64
        ))
    );
    let _ = writeln!(
        out,
        "jobs       waiting {}  in flight {}  retry {}  dead {}",
        jobs.waiting,
        jobs.in_flight,
        jobs.retry,
        paint(
            &jobs.dead.to_string(),
            if jobs.dead > 0 {
                Paint::Bad
            } else {
                Paint::None
            },
            style
        )
    );
    let oldest = match &jobs.oldest_waiting {
        None => "none waiting".to_string(),
        Some(job) => {
            let age = job
                .age_ms
                .map(format_age)
                .unwrap_or_else(|| "age unknown (no readable createdAt)".into());
            match &job.id {
                Some(id) => format!("{age}, job {id}"),
                None => age,
            }
        }
    };
    let _ = writeln!(out, "oldest     {oldest}");
    let _ = writeln!(
        out,
        "processed  {:<10} {:.1}/min",
        snapshot.processed.total, snapshot.processed.per_minute
    );
    let _ = writeln!(
        out,
        "failed     {:<10} {:.1}/min   (rates over the last {:.0} s)",
        snapshot.failed.total, snapshot.failed.per_minute, snapshot.rate_window_secs
    );

    out.push('\n');
    if snapshot.workers.is_empty() {
        let _ = writeln!(
            out,
            "no worker instance has a heartbeat or an in-flight list"
        );
        return;
    }
    let rows: Vec<[String; 6]> = snapshot
        .workers
        .iter()
        .map(|worker| worker_row(worker, hosts))
        .collect();
    let header = ["WORKER", "HOST", "STATE", "IN FLIGHT", "PID", "STARTED"].map(String::from);
    let widths: Vec<usize> = (0..6)
        .map(|column| {
            rows.iter()
                .chain(std::iter::once(&header))
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (index, row) in std::iter::once(&header).chain(&rows).enumerate() {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            let padding = " ".repeat(widths[column] - cell.chars().count());
            let cell = match (index, column) {
                (0, _) | (_, 0) | (_, 1) | (_, 3..) => cell.clone(),
                (_, _) if cell == "alive" => paint(cell, Paint::Good, style),
                (_, _) => paint(cell, Paint::Bad, style),
            };
            line.push_str(&cell);
            line.push_str(&padding);
            line.push_str("  ");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn worker_row(worker: &WorkerInstance, hosts: &[WorkerHost]) -> [String; 6] {
    let host = hosts
        .iter()
        .find(|host| host.instance.as_deref() == Some(worker.instance.as_str()))
        .map_or("-".to_string(), |host| host.name.clone());
    let dash = || "-".to_string();
    [
        worker.instance.clone(),
        host,
        if worker.alive { "alive" } else { "dead" }.to_string(),
        worker.in_flight.to_string(),
        worker.pid.map_or_else(dash, |pid| pid.to_string()),
        worker.started_at.clone().unwrap_or_else(dash),
    ]
}

/// Formats a duration in milliseconds as `850 ms`, `4.2 s`, `12 min 5 s` or `3 h 7 min`.
pub fn format_age(ms: i64) -> String {
    let secs = ms / 1000;
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {} s", secs / 60, secs % 60)
    } else {
        format!("{} h {} min", secs / 3600, secs % 3600 / 60)
    }
}

#[derive(Clone, Copy)]
enum Paint {
    None,
    Good,
    Bad,
}

fn paint(text: &str, paint: Paint, style: Style) -> String {
    match (style.colour, paint) {
        (true, Paint::Good) => format!("\x1b[32m{text}\x1b[0m"),
        (true, Paint::Bad) => format!("\x1b[31m{text}\x1b[0m"),
        _ => text.to_string(),
    }
}

/// Cuts `line` to `width` visible characters, not counting ANSI colour escapes, ending a
/// cut line with "…".
fn cut(line: &str, width: usize) -> String {
    let mut visible = 0;
    let mut cut = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            cut.push(c);
            for escape in chars.by_ref() {
                cut.push(escape);
                if escape.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        if visible + 1 == width && chars.peek().is_some() {
            cut.push('…');
            if line.contains('\x1b') {
                cut.push_str("\x1b[0m");
            }
            return cut;
        }
        cut.push(c);
        visible += 1;
    }
    cut
}

/// Renders `report` as JSON: indented for a single report, one line per report with
/// `--watch` so that a reader can take one document per line.
/// Keys of the queue snapshot in the JSON document, present as `null` when Redis could not be
/// read, so that a script reading one never finds it missing.
const SNAPSHOT_KEYS: [&str; 7] = [
    "time_unix_ms",
    "queue",
    "jobs",
    "processed",
    "failed",
    "rate_window_secs",
    "workers",
];

pub fn json(report: &StatusReport, one_line: bool) -> String {
    let mut value = serde_json::to_value(report).expect("status report serializes");
    if let Some(object) = value.as_object_mut() {
        for key in SNAPSHOT_KEYS.iter().chain(&["error"]) {
            object
                .entry(key.to_string())
                .or_insert(serde_json::Value::Null);
        }
    }
    let text = if one_line {
        serde_json::to_string(&value)
    } else {
        serde_json::to_string_pretty(&value)
    };
    text.expect("status report serializes") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::snapshot::{Counter, JobCounts, WaitingJob};

    fn worker(instance: &str, alive: bool, in_flight: u64) -> WorkerInstance {
        WorkerInstance {
            instance: instance.into(),
            alive,
            in_flight,
            heartbeat_ttl_ms: alive.then_some(12_000),
            pid: alive.then_some(4242),
            started_at: alive.then(|| "2025-01-01T11:00:00.000Z".to_string()),
            version: alive.then(|| "0.1.0".to_string()),
            concurrency: alive.then_some(4),
        }
    }

    fn snapshot(workers: Vec<WorkerInstance>) -> QueueSnapshot {
        QueueSnapshot {
            time_unix_ms: 1_735_732_800_000,
            queue: "yametee:jobs".into(),
            jobs: JobCounts {
                waiting: 12,
                in_flight: 3,
                retry: 1,
                dead: 2,
                oldest_waiting: Some(WaitingJob {
                    id: Some("order-1".into()),
                    created_at: Some("2025-01-01T11:59:55.800Z".into()),
                    age_ms: Some(4_200),
                }),
            },
            processed: Counter {
                total: 12_345,
                per_minute: 41.54,
            },
            failed: Counter {
                total: 7,
                per_minute: 0.0,
            },
            rate_window_secs: 84.0,
            workers,
        }
    }

    fn worker_host() -> WorkerHost {
        WorkerHost {
            name: "worker".into(),
            instance: Some("yametee-worker@worker".into()),
            reachable: true,
            journal: vec![
                "2025-01-01T11:59:58+0000 worker yametee-worker[4242]: Processing job order-0 of type order:process".into(),
                "2025-01-01T11:59:58+0000 worker yametee-worker[4242]: Order o-0 processed: completed".into(),
            ],
            error: None,
        }
    }

    fn fixed_report() -> StatusReport {
        StatusReport::new(
            Ok(snapshot(vec![
                worker("yametee-worker@old-host", false, 3),
                worker("yametee-worker@worker", true, 0),
            ])),
            vec![worker_host()],
        )
    }

    #[test]
    fn human_table_of_fixed_snapshot() {
        let text = human(&fixed_report(), Style::PLAIN);
        let expected = "\
yametee:jobs at 2025-01-01T12:00:00.000Z (Redis time)
jobs       waiting 12  in flight 3  retry 1  dead 2
oldest     4.2 s, job order-1
processed  12345      41.5/min
failed     7          0.0/min   (rates over the last 84 s)

WORKER                   HOST    STATE  IN FLIGHT  PID   STARTED
yametee-worker@old-host  -       dead   3          -     -
yametee-worker@worker    worker  alive  0          4242  2025-01-01T11:00:00.000Z

journal of worker (last 2 lines)
  2025-01-01T11:59:58+0000 worker yametee-worker[4242]: Processing job order-0 of type order:process
  2025-01-01T11:59:58+0000 worker yametee-worker[4242]: Order o-0 processed: completed
";
        assert_eq!(text, expected);
    }

    #[test]
    fn human_table_without_redis() {
        let mut host = worker_host();
        host.reachable = false;
        host.instance = None;
        host.journal.clear();
        host.error = Some(
            "connecting to host worker (deploy@192.168.120.45:22) timed out after 20 s".into(),
        );
        let report = StatusReport::new(
            Err("cannot connect to Redis at /tmp/s/redis.sock: connection refused".into()),
            vec![host],
        );

        let text = human(&report, Style::PLAIN);

        assert!(!report.ok);
        assert_eq!(
            text,
            "redis unreadable: cannot connect to Redis at /tmp/s/redis.sock: connection refused\n\
             \n\
             worker: unreachable: connecting to host worker (deploy@192.168.120.45:22) timed out after 20 s\n"
        );
    }

    #[test]
    fn colour_marks_states() {
        let text = human(
            &fixed_report(),
            Style {
                colour: true,
                width: None,
            },
        );
        assert!(text.contains("\x1b[32malive\x1b[0m"), "{text}");
        assert!(text.contains("\x1b[31mdead\x1b[0m"), "{text}");
        assert!(!human(&fixed_report(), Style::PLAIN).contains('\x1b'));
    }

    #[test]
    fn width_cuts_long_lines() {
        let text = human(
            &fixed_report(),
            Style {
                colour: false,
                width: Some(40),
            },
        );
        for line in text.lines() {
            assert!(line.chars().count() <= 40, "{line:?}");
        }
        assert!(
            text.contains("  2025-01-01T11:59:58+0000 worker yamet…\n"),
            "{text}"
        );
    }

    #[test]
    fn cut_skips_colour_escapes() {
        assert_eq!(cut("\x1b[32malive\x1b[0m", 10), "\x1b[32malive\x1b[0m");
        assert_eq!(cut("\x1b[32malive\x1b[0m", 3), "\x1b[32mal…\x1b[0m");
        assert_eq!(cut("abc", 3), "abc");
    }

    #[test]
    fn ok_needs_every_worker_alive_and_host_reachable() {
        assert!(!fixed_report().ok);

        let alive = StatusReport::new(
            Ok(snapshot(vec![worker("yametee-worker@worker", true, 0)])),
            vec![worker_host()],
        );
        assert!(alive.ok);

        let mut unreachable = worker_host();
        unreachable.reachable = false;
        let report = StatusReport::new(
            Ok(snapshot(vec![worker("yametee-worker@worker", true, 0)])),
            vec![unreachable],
        );
        assert!(!report.ok);
    }

    #[test]
    fn json_document_of_fixed_snapshot() {
        let document: serde_json::Value =
            serde_json::from_str(&json(&fixed_report(), false)).unwrap();

        assert_eq!(document["ok"], false);
        assert_eq!(document["queue"], "yametee:jobs");
        assert_eq!(document["time_unix_ms"], 1_735_732_800_000_i64);
        assert_eq!(document["jobs"]["waiting"], 12);
        assert_eq!(document["jobs"]["in_flight"], 3);
        assert_eq!(document["jobs"]["retry"], 1);
        assert_eq!(document["jobs"]["dead"], 2);
        assert_eq!(document["jobs"]["oldest_waiting"]["id"], "order-1");
        assert_eq!(document["jobs"]["oldest_waiting"]["age_ms"], 4_200);
        assert_eq!(document["processed"]["total"], 12_345);
        assert_eq!(document["processed"]["per_minute"], 41.54);
        assert_eq!(document["failed"]["total"], 7);
        assert_eq!(document["rate_window_secs"], 84.0);
        assert_eq!(
            document["workers"][0]["instance"],
            "yametee-worker@old-host"
        );
        assert_eq!(document["workers"][0]["alive"], false);
        assert_eq!(document["workers"][1]["pid"], 4242);
        assert_eq!(document["hosts"][0]["name"], "worker");
        assert_eq!(document["hosts"][0]["instance"], "yametee-worker@worker");
        assert_eq!(document["hosts"][0]["journal"].as_array().unwrap().len(), 2);
        assert_eq!(document["error"], serde_json::Value::Null);
    }

    #[test]
    fn json_without_redis_has_error_and_null_counts() {
        let report = StatusReport::new(Err("connection refused".into()), vec![]);
        let line = json(&report, true);

        assert_eq!(line.lines().count(), 1);
        let document: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(document["ok"], false);
        assert_eq!(document["error"], "connection refused");
        for key in SNAPSHOT_KEYS {
            assert_eq!(document[key], serde_json::Value::Null, "{key}");
        }
        assert!(document.get("jobs").is_some());
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(format_age(850), "850 ms");
        assert_eq!(format_age(4_200), "4.2 s");
        assert_eq!(format_age(725_000), "12 min 5 s");
        assert_eq!(format_age(11_220_000), "3 h 7 min");
    }
}
