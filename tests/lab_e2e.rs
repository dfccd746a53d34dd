//! End to end on the lab: boots a replica of inventory.yaml in systemd-nspawn containers,
//! applies, verifies that every check passes, checks that a second apply changes and
//! restarts nothing, that a worker which never reports ready is rolled back, and takes the
//! lab down. Needs root, systemd-nspawn and debootstrap
//! (`scripts/setup.sh` installs them); where they are missing the test says so and skips,
//! except under CI, where it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn deploy_binary() -> PathBuf {
    std::env::var_os("YAMETEE_DEPLOY_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_yametee-deploy")))
}

fn worker_binary() -> PathBuf {
    std::env::var_os("YAMETEE_WORKER_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| deploy_binary().with_file_name("yametee-worker"))
}

fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    for program in ["systemd-nspawn", "debootstrap", "ip"] {
        let found = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).exists()))
            .unwrap_or(false);
        if !found {
            return Some(format!("{program} is not installed (run scripts/setup.sh)"));
        }
    }
    if !worker_binary().exists() {
        return Some(format!(
            "no worker binary at {} (run cargo build --release --workspace)",
            worker_binary().display()
        ));
    }
    None
}

fn deploy(args: &[&str]) -> Output {
    deploy_worker(&worker_binary(), args)
}

fn deploy_worker(worker: &Path, args: &[&str]) -> Output {
    deploy_with(&repository_inventory(), worker, args)
}

fn repository_inventory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("inventory.yaml")
}

fn deploy_command(inventory: &Path, worker: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(deploy_binary());
    command
        .arg("-i")
        .arg(inventory)
        .arg("--worker-binary")
        .arg(worker)
        .args(args)
        .env("NO_COLOR", "1");
    command
}

fn deploy_with(inventory: &Path, worker: &Path, args: &[&str]) -> Output {
    let output = deploy_command(inventory, worker, args)
        .output()
        .expect("yametee-deploy runs");
    eprintln!(
        "$ yametee-deploy {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "stdout is not JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Takes the lab down when the test ends, whether it passed or not.
struct Lab;

impl Drop for Lab {
    fn drop(&mut self) {
        let output = deploy(&["lab", "down"]);
        if !output.status.success() && !std::thread::panicking() {
            panic!("lab down failed");
        }
    }
}

#[test]
fn lab_apply_verify_and_roll_back() {
    if let Some(reason) = missing_prerequisite() {
        if std::env::var_os("CI").is_some() {
            panic!("the lab end-to-end test cannot run under CI: {reason}");
        }
        eprintln!("SKIPPED lab_apply_verify_and_roll_back: {reason}");
        return;
    }

    // Start from fresh hosts, so the first apply really converges them from scratch.
    let down = deploy(&["lab", "down"]);
    assert!(down.status.success(), "lab down before the test failed");
    let up = deploy(&["lab", "up"]);
    let lab = Lab;
    assert!(
        up.status.success(),
        "lab up failed:\n{}",
        String::from_utf8_lossy(&up.stdout)
    );

    let first = deploy(&["--lab", "--format", "json", "apply"]);
    let first_report = json(&first);
    assert_eq!(
        first.status.code(),
        Some(0),
        "first apply failed: {first_report:#}"
    );
    assert_eq!(first_report["ok"], true);
    for host in first_report["hosts"].as_array().expect("hosts") {
        assert_eq!(
            host["outcome"], "changed",
            "first apply left {} untouched: {host:#}",
            host["name"]
        );
    }
    let worker_restarts = first_report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|host| host["name"] == "worker")
        .map(|host| host["restarted"].to_string())
        .unwrap_or_default();
    assert!(
        worker_restarts.contains("yametee-worker.service"),
        "worker not started: {worker_restarts}"
    );

    let verify = deploy(&["--lab", "--format", "json", "verify"]);
    let report = json(&verify);
    let failed = failed_checks(&report);
    assert!(
        failed.is_empty(),
        "checks that did not pass: {failed:?}\n{report:#}"
    );
    assert_eq!(verify.status.code(), Some(0));
    assert_eq!(report["ok"], true);
    let check_ids: Vec<&str> = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|host| {
            host["checks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|check| check["id"].as_str().unwrap())
        })
        .collect();
    for id in [
        "ssh.reachable",
        "worker.startup-log",
        "worker.redis-ping",
        "worker.postgres-select1",
        "queue.depth",
        "e2e.probe-job",
        "firewall.rules",
        "firewall.blocks-redis",
    ] {
        assert!(
            check_ids.contains(&id),
            "verify has no {id} check: {check_ids:?}"
        );
    }

    // A job pushed the web platform's way is processed by the worker, as the runbook checks in
    // the worker's journal.
    let push = deploy(&[
        "--lab",
        "job",
        "push",
        "cache:warm",
        "{}",
        "--id",
        "e2e-cache-warm",
    ]);
    assert_eq!(push.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&push.stdout).trim(),
        "e2e-cache-warm"
    );
    let expected = "Processing job e2e-cache-warm of type cache:warm";
    let started = std::time::Instant::now();
    loop {
        let journal = deploy(&[
            "lab",
            "ssh",
            "worker",
            "sudo",
            "journalctl",
            "-u",
            "yametee-worker",
            "--no-pager",
            "-o",
            "cat",
        ]);
        if String::from_utf8_lossy(&journal.stdout).contains(expected) {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 20,
            "the worker never logged {expected:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }

    let second = deploy(&["--lab", "--format", "json", "apply"]);
    let second_report = json(&second);
    assert_eq!(
        second.status.code(),
        Some(0),
        "second apply failed: {second_report:#}"
    );
    for host in second_report["hosts"].as_array().expect("hosts") {
        assert_eq!(
            host["outcome"], "unchanged",
            "second apply changed {}: {host:#}",
            host["name"]
        );
        assert_eq!(
            host["changes"].as_array().map(Vec::len),
            Some(0),
            "{host:#}"
        );
        assert_eq!(
            host["restarted"].as_array().map(Vec::len),
            Some(0),
            "{host:#}"
        );
    }

    let plan = deploy(&["--lab", "plan", "--detailed-exitcode"]);
    assert_eq!(
        plan.status.code(),
        Some(0),
        "plan after apply is not in sync:\n{}",
        String::from_utf8_lossy(&plan.stdout)
    );

    // Working on some hosts must render the others' access exactly as a full run does.
    for limit in ["postgres", "redis", "worker", "web,worker"] {
        let limited = deploy(&["--lab", "--limit", limit, "plan", "--detailed-exitcode"]);
        assert_eq!(
            limited.status.code(),
            Some(0),
            "plan --limit {limit} is not in sync:\n{}",
            String::from_utf8_lossy(&limited.stdout)
        );
    }

    // /bin/false is a valid ELF binary that exits at once without reporting ready, so apply
    // must put the previous release back and fail.
    let broken = deploy_worker(
        Path::new("/bin/false"),
        &["--lab", "--format", "json", "apply"],
    );
    let broken_report = json(&broken);
    assert_eq!(
        broken.status.code(),
        Some(1),
        "apply of a broken worker did not fail: {broken_report:#}"
    );
    assert_eq!(broken_report["ok"], false);
    let worker = broken_report["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|host| host["name"] == "worker")
        .expect("worker host in the report");
    assert_eq!(worker["outcome"], "rolled-back", "{worker:#}");
    assert!(
        worker["error"]
            .as_str()
            .unwrap_or_default()
            .contains("did not become ready"),
        "{worker:#}"
    );

    let after_rollback = deploy(&["--lab", "--format", "json", "verify"]);
    assert_eq!(
        after_rollback.status.code(),
        Some(0),
        "verify after the rollback failed: {:#}",
        json(&after_rollback)
    );

    let third = deploy(&["--lab", "--format", "json", "apply"]);
    let third_report = json(&third);
    assert_eq!(third.status.code(), Some(0), "{third_report:#}");
    for host in third_report["hosts"].as_array().expect("hosts") {
        assert_eq!(
            host["outcome"], "unchanged",
            "apply after the rollback changed {}: {host:#}",
            host["name"]
        );
    }

    let scratch = tempfile::tempdir().expect("temporary directory");
    one_setting_change_restarts_only_worker(scratch.path());
    interrupted_apply_restarts_next_time(scratch.path());
    changed_host_key_is_refused();

    let restored = deploy(&["--lab", "--format", "json", "apply"]);
    assert_eq!(restored.status.code(), Some(0), "{:#}", json(&restored));
    stopped_worker_fails_its_checks();
    let final_verify = deploy(&["--lab", "--format", "json", "verify"]);
    assert_eq!(
        final_verify.status.code(),
        Some(0),
        "{:#}",
        json(&final_verify)
    );

    drop(lab);
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip runs");
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains("ytd-"),
        "a lab namespace is left: {}",
        String::from_utf8_lossy(&netns.stdout)
    );
    let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
    assert!(
        !mounts.lines().any(|line| line.contains("yametee-deploy")),
        "a lab mount is left"
    );
}

/// Writes a copy of the repository's inventory with the worker's concurrency set to `value`.
fn inventory_with_concurrency(dir: &Path, value: u32) -> PathBuf {
    let text = std::fs::read_to_string(repository_inventory()).expect("inventory.yaml");
    assert!(
        text.contains("concurrency: 4"),
        "inventory.yaml no longer sets concurrency: 4"
    );
    let path = dir.join(format!("inventory-concurrency-{value}.yaml"));
    std::fs::write(
        &path,
        text.replace("concurrency: 4", &format!("concurrency: {value}")),
    )
    .expect("writing the changed inventory");
    path
}

fn host<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|host| host["name"] == name)
        .unwrap_or_else(|| panic!("no host {name} in {report:#}"))
}

fn lab_secret_values() -> Vec<String> {
    let dir = std::env::var_os("YAMETEE_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/yametee-deploy/lab"));
    let text = std::fs::read_to_string(dir.join("secrets.json")).expect("lab secrets.json");
    let secrets: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&text).expect("secrets.json is a JSON object of strings");
    secrets.into_values().collect()
}

/// Changing one setting shows exactly that diff, with no secret in it, and restarts only the
/// worker.
fn one_setting_change_restarts_only_worker(dir: &Path) {
    let changed = inventory_with_concurrency(dir, 2);
    let plan = deploy_with(
        &changed,
        &worker_binary(),
        &["--lab", "--format", "json", "plan", "--detailed-exitcode"],
    );
    assert_eq!(plan.status.code(), Some(2), "changes must be pending");
    let report = json(&plan);
    for name in ["web", "postgres", "redis"] {
        assert_eq!(
            host(&report, name)["changes"].as_array().map(Vec::len),
            Some(0),
            "{report:#}"
        );
    }
    let worker = host(&report, "worker");
    let changes: Vec<String> = worker["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|change| {
            format!(
                "{} {} {}",
                change["action"], change["kind"], change["target"]
            )
        })
        .collect();
    assert_eq!(
        changes,
        vec![
            r#""update" "file" "/etc/yametee-worker/worker.env""#,
            r#""restart" "service" "yametee-worker.service""#,
        ]
    );
    let diff = worker["diffs"].to_string();
    assert!(diff.contains("-WORKER_CONCURRENCY=4"), "{diff}");
    assert!(diff.contains("+WORKER_CONCURRENCY=2"), "{diff}");
    let stdout = String::from_utf8_lossy(&plan.stdout);
    for secret in lab_secret_values() {
        assert!(
            !stdout.contains(&secret),
            "a lab secret appears in the plan"
        );
    }

    let apply = deploy_with(
        &changed,
        &worker_binary(),
        &["--lab", "--format", "json", "apply"],
    );
    let report = json(&apply);
    assert_eq!(apply.status.code(), Some(0), "{report:#}");
    assert_eq!(
        host(&report, "worker")["restarted"],
        serde_json::json!(["yametee-worker.service"])
    );
    for name in ["web", "postgres", "redis"] {
        assert_eq!(
            host(&report, name)["restarted"],
            serde_json::json!([]),
            "{report:#}"
        );
    }
}

/// An apply killed after it wrote the worker's env file but before it restarted the worker
/// still restarts it on the next run, because the pending restart is recorded on the host.
fn interrupted_apply_restarts_next_time(dir: &Path) {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::process::CommandExt;

    let changed = inventory_with_concurrency(dir, 3);
    // A binary padded with 200 MB makes the upload, which follows the file writes, slow enough
    // to interrupt.
    let big = dir.join("padded-worker");
    std::fs::copy(worker_binary(), &big).expect("copying the worker binary");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&big)
        .expect("opening the copy");
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..200 {
        file.write_all(&chunk).expect("padding the copy");
    }
    drop(file);

    let mut child = deploy_command(&changed, &big, &["--lab", "apply"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("yametee-deploy starts");
    let stderr = child.stderr.take().expect("stderr");
    let started = std::time::Instant::now();
    let mut uploading = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("reading stderr");
        eprintln!("{line}");
        if line.contains("install release") {
            uploading = true;
            break;
        }
        assert!(
            started.elapsed().as_secs() < 120,
            "apply never reached the upload"
        );
    }
    assert!(uploading, "apply ended before the upload");
    // SAFETY: the child leads its own process group, so this signals only it and its ssh
    // processes.
    unsafe { libc::killpg(child.id() as i32, libc::SIGKILL) };
    child.wait().expect("waiting for the killed apply");

    let rerun = deploy_with(
        &changed,
        &worker_binary(),
        &["--lab", "--format", "json", "apply"],
    );
    let report = json(&rerun);
    assert_eq!(rerun.status.code(), Some(0), "{report:#}");
    let worker = host(&report, "worker");
    assert_eq!(
        worker["restarted"],
        serde_json::json!(["yametee-worker.service"]),
        "{worker:#}"
    );
    let kinds: Vec<&str> = worker["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.iter().all(|kind| *kind == "service"),
        "only the owed restart should remain: {worker:#}"
    );
}

/// A host whose key differs from the pinned one is refused, with the key named.
fn changed_host_key_is_refused() {
    let dir = std::env::var_os("YAMETEE_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/yametee-deploy/lab"));
    let path = dir.join("known_hosts");
    let original = std::fs::read_to_string(&path).expect("lab known_hosts");
    let web_key = original
        .lines()
        .find_map(|line| line.strip_prefix("192.168.120.50 "))
        .expect("web host key");
    let tampered: String = original
        .lines()
        .map(|line| {
            if line.starts_with("192.168.120.45 ") {
                format!("192.168.120.45 {web_key}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    std::fs::write(&path, tampered).expect("writing known_hosts");
    let plan = deploy(&["--lab", "--limit", "worker", "plan"]);
    std::fs::write(&path, original).expect("restoring known_hosts");

    assert_eq!(plan.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&plan.stdout);
    assert!(
        stdout.contains("host key of worker (192.168.120.45) does not match"),
        "{stdout}"
    );
}

/// The ids of the checks of `report` that did not pass, as `host/id`.
fn failed_checks(report: &Value) -> Vec<String> {
    let mut failed: Vec<String> = report["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .flat_map(|host| {
            host["checks"]
                .as_array()
                .expect("checks")
                .iter()
                .filter(|check| check["status"] != "pass")
                .map(move |check| {
                    format!(
                        "{}/{}",
                        host["name"].as_str().unwrap(),
                        check["id"].as_str().unwrap()
                    )
                })
        })
        .collect();
    failed.sort();
    failed
}

/// A stopped worker turns exactly the checks that depend on it red, and apply starts it again.
fn stopped_worker_fails_its_checks() {
    let stop = deploy(&[
        "lab",
        "ssh",
        "worker",
        "sudo",
        "systemctl",
        "stop",
        "yametee-worker",
    ]);
    assert_eq!(stop.status.code(), Some(0), "stopping the worker failed");

    let verify = deploy(&[
        "--lab",
        "--format",
        "json",
        "verify",
        "--probe-timeout",
        "3",
    ]);
    assert_eq!(
        verify.status.code(),
        Some(1),
        "verify passed with the worker stopped"
    );
    let report = json(&verify);
    assert_eq!(report["ok"], false);
    assert_eq!(
        failed_checks(&report),
        vec![
            "web/e2e.probe-job",
            "worker/unit.yametee-worker",
            "worker/worker.memory",
            "worker/worker.startup-log",
        ],
        "{report:#}"
    );

    let apply = deploy(&["--lab", "--format", "json", "apply"]);
    let report = json(&apply);
    assert_eq!(apply.status.code(), Some(0), "{report:#}");
    let worker = host(&report, "worker");
    assert_eq!(
        worker["restarted"],
        serde_json::json!([]),
        "a stopped unit is started, not restarted: {worker:#}"
    );
    let actions: Vec<String> = worker["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|change| {
            format!(
                "{} {}",
                change["action"].as_str().unwrap(),
                change["target"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(actions, vec!["start yametee-worker.service"], "{worker:#}");
}
