//! End to end on the lab: boots a replica of inventory.yaml in systemd-nspawn containers,
//! applies, and verifies that every check passes. It then checks that a second apply changes
//! and restarts nothing, and that a worker which never reports ready is rolled back. Each
//! deliberate breakage must turn exactly its checks red, and a cut connection must fail only
//! its host. A second worker joins, takes a rolling deploy without losing a job, and leaves
//! again. At the end the test takes the lab down. Needs root, systemd-nspawn and debootstrap
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
    breakages_turn_their_checks_red();
    cut_connection_fails_only_its_host();
    second_worker_joins_and_leaves(scratch.path());
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

/// Reads the lab's generated secrets, by environment variable name.
fn lab_secrets() -> std::collections::BTreeMap<String, String> {
    let text = std::fs::read_to_string(lab_dir().join("secrets.json")).expect("lab secrets.json");
    serde_json::from_str(&text).expect("secrets.json is a JSON object of strings")
}

fn lab_secret_values() -> Vec<String> {
    lab_secrets().into_values().collect()
}

fn lab_redis_password() -> String {
    lab_secrets()
        .remove("YAMETEE_REDIS_PASSWORD")
        .expect("the lab's Redis password")
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
    let path = lab_dir().join("known_hosts");
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
    let status = deploy(&["--lab", "--format", "json", "status"]);
    let report = json(&status);
    assert_eq!(status.status.code(), Some(0), "{report:#}");
    assert_eq!(
        workers_alive(&report),
        vec![("yametee-worker@worker".into(), true)]
    );

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

    let status = deploy(&["--lab", "--format", "json", "status"]);
    let report = json(&status);
    assert_eq!(status.status.code(), Some(1), "{report:#}");
    assert_eq!(report["ok"], false);
    assert_eq!(
        workers_alive(&report),
        vec![("yametee-worker@worker".into(), false)]
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

fn lab_dir() -> PathBuf {
    std::env::var_os("YAMETEE_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/yametee-deploy/lab"))
}

/// Runs `redis-cli ARGS` on the lab's Redis host, the password passed on standard input.
fn lab_redis(args: &str) -> String {
    let script =
        format!("IFS= read -r REDISCLI_AUTH; export REDISCLI_AUTH; redis-cli --no-raw {args}");
    let child = spawn_with_redis_password("redis", &script);
    let output = child.wait_with_output().expect("lab ssh runs");
    assert!(
        output.status.success(),
        "redis-cli {args} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Reads an integer reply such as `(integer) 3` or `"3"`; a missing key counts as 0.
fn redis_number(reply: &str) -> u64 {
    let value = reply
        .trim_start_matches("(integer) ")
        .trim_matches('"')
        .trim();
    if value == "(nil)" {
        return 0;
    }
    value
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {reply}"))
}

fn lab_ssh(host: &str, command: &str) -> String {
    let output = deploy(&["lab", "ssh", host, command]);
    assert!(
        output.status.success(),
        "`{command}` on {host} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs verify and returns its exit code, its JSON report and the checks that did not pass.
fn verify_failures(inventory: &Path) -> (Option<i32>, Value, Vec<String>) {
    let output = deploy_with(
        inventory,
        &worker_binary(),
        &[
            "--lab",
            "--format",
            "json",
            "verify",
            "--probe-timeout",
            "5",
        ],
    );
    let report = json(&output);
    let failed = failed_checks(&report);
    (output.status.code(), report, failed)
}

fn check_detail<'a>(report: &'a Value, host_name: &str, id: &str) -> &'a str {
    host(report, host_name)["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|check| check["id"] == id)
        .and_then(|check| check["detail"].as_str())
        .unwrap_or_else(|| panic!("no check {id} on {host_name}: {report:#}"))
}

/// Checks that a removed ufw rule, a queue past its threshold and Redis blocked from the
/// worker each turn exactly the checks that detect them red, with messages naming the fault.
/// JUnit counts must match the JSON report, and apply repairs what it manages.
fn breakages_turn_their_checks_red() {
    let inventory = repository_inventory();

    lab_ssh("web", "sudo ufw delete allow 80/tcp");
    let (code, report, failed) = verify_failures(&inventory);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(failed, vec!["web/firewall.rules"], "{report:#}");
    let detail = check_detail(&report, "web", "firewall.rules");
    assert!(detail.contains("missing: `allow 80/tcp"), "{detail}");

    let junit = deploy(&[
        "--lab",
        "--format",
        "junit",
        "verify",
        "--probe-timeout",
        "5",
    ]);
    assert_eq!(junit.status.code(), Some(1));
    let xml = String::from_utf8_lossy(&junit.stdout).into_owned();
    let total: usize = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|host| host["checks"].as_array().unwrap().len())
        .sum();
    let root = xml
        .lines()
        .find(|line| line.trim_start().starts_with("<testsuites"))
        .unwrap_or_else(|| panic!("no <testsuites> element: {xml}"));
    assert!(root.contains(&format!("tests=\"{total}\"")), "{root}");
    assert!(root.contains("failures=\"1\""), "{root}");
    assert_eq!(xml.matches("<testcase").count(), total, "{xml}");
    assert_eq!(xml.matches("<failure").count(), 1, "{xml}");

    let repaired = deploy(&["--lab", "--format", "json", "apply"]);
    assert_eq!(repaired.status.code(), Some(0), "{:#}", json(&repaired));

    // A job for an order that does not exist fails for good and lands in the dead list,
    // whose threshold is 1.
    let pushed = deploy(&[
        "--lab",
        "job",
        "push",
        "order:process",
        r#"{"orderId":"no-such-order"}"#,
    ]);
    assert!(pushed.status.success(), "job push failed");
    let mut dead = 0;
    for _ in 0..50 {
        dead = redis_number(&lab_redis("LLEN yametee:jobs:dead"));
        if dead > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(dead, 1, "the job never reached the dead list");
    let (code, report, failed) = verify_failures(&inventory);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(failed, vec!["redis/queue.depth"], "{report:#}");
    let detail = check_detail(&report, "redis", "queue.depth");
    assert!(
        detail.contains("dead 1 reaches the threshold 1"),
        "{detail}"
    );
    lab_redis("DEL yametee:jobs:dead");

    // The worker's connection made before the rule went stays open, so jobs still flow; a new
    // connection from the worker's address is dropped.
    lab_ssh(
        "redis",
        "sudo ufw delete allow from 192.168.120.45 to any port 6379 proto tcp",
    );
    let (code, report, failed) = verify_failures(&inventory);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(
        failed,
        vec!["redis/firewall.rules", "worker/worker.redis-ping"],
        "{report:#}"
    );
    let detail = check_detail(&report, "worker", "worker.redis-ping");
    assert!(detail.contains("no answer within 3 s"), "{detail}");

    let repaired = deploy(&["--lab", "--format", "json", "apply"]);
    assert_eq!(repaired.status.code(), Some(0), "{:#}", json(&repaired));
    let (code, report, failed) = verify_failures(&inventory);
    assert_eq!((code, failed), (Some(0), vec![]), "{report:#}");
}

/// Cutting one host's SSH connection mid-apply fails that host with a clear message; the
/// other hosts finish, and the next apply completes it.
fn cut_connection_fails_only_its_host() {
    use std::io::{BufRead, BufReader};

    // Drift on both: PostgreSQL's settings file (whose restart takes a couple of seconds
    // under Debian's wrapper, the window to cut in) and the web host's env file.
    lab_ssh(
        "postgres",
        "sudo rm /etc/postgresql/15/main/conf.d/yametee.conf",
    );
    lab_ssh("web", "sudo rm /etc/yametee-web/web.env");

    let mut child = deploy_command(
        &repository_inventory(),
        &worker_binary(),
        &["--lab", "--format", "json", "apply"],
    )
    .env("RUST_LOG", "yametee_deploy=info")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("yametee-deploy starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut cut = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("reading stderr");
        eprintln!("{line}");
        if !cut && line.contains("restart service postgresql.service") {
            // Kill the web host's SSH sockets from inside its network namespace: the
            // connection is reset as when sshd dies or the host reboots.
            let killed = Command::new("ip")
                .args(["netns", "exec", "ytd-h-web", "ss", "-K", "sport = :22"])
                .output()
                .expect("ss runs");
            assert!(
                String::from_utf8_lossy(&killed.stdout).contains("192.168.120.50"),
                "no SSH socket to cut on web: {}",
                String::from_utf8_lossy(&killed.stdout)
            );
            cut = true;
        }
    }
    let output = child.wait_with_output().expect("apply ends");
    assert!(cut, "apply never restarted PostgreSQL");
    let report = json(&output);
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    let web = host(&report, "web");
    assert_eq!(web["outcome"], "failed", "{web:#}");
    let error = web["error"].as_str().expect("an error for web");
    assert!(
        error.contains("lost the SSH connection to host web"),
        "{error}"
    );
    assert_eq!(
        host(&report, "postgres")["outcome"],
        "changed",
        "{report:#}"
    );
    for name in ["redis", "worker"] {
        assert_eq!(host(&report, name)["outcome"], "unchanged", "{report:#}");
    }

    let rerun = deploy(&["--lab", "--format", "json", "apply"]);
    let report = json(&rerun);
    assert_eq!(rerun.status.code(), Some(0), "{report:#}");
    assert_eq!(host(&report, "web")["outcome"], "changed", "{report:#}");
}

/// Lists each worker instance in a `status --format json` report and whether it is alive.
fn workers_alive(report: &Value) -> Vec<(String, bool)> {
    report["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no workers in {report:#}"))
        .iter()
        .map(|worker| {
            (
                worker["instance"].as_str().expect("instance").to_string(),
                worker["alive"].as_bool().expect("alive"),
            )
        })
        .collect()
}

/// Addresses ufw on `host` lets reach `port`, from `ufw show added`.
fn allowed_sources(host_name: &str, port: u16) -> Vec<String> {
    let added = lab_ssh(host_name, "sudo ufw show added");
    let mut sources: Vec<String> = added
        .lines()
        .filter(|line| line.contains(&format!(" port {port} ")))
        .filter_map(|line| {
            line.split_whitespace()
                .skip_while(|word| *word != "from")
                .nth(1)
                .map(String::from)
        })
        .collect();
    sources.sort();
    sources
}

/// Returns the systemd times (microseconds) at which the worker on `host_name` last began
/// stopping and was last started again.
fn restart_window(host_name: &str) -> (u64, u64) {
    let journal = lab_ssh(
        host_name,
        "sudo journalctl -u yametee-worker.service -o short-unix --no-pager --since=-300s \
         | grep -E 'Stopping yametee-worker|Started yametee-worker'",
    );
    let time_of = |needle: &str| -> u64 {
        let line = journal
            .lines()
            .rev()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in the journal of {host_name}: {journal}"));
        let seconds: f64 = line
            .split_whitespace()
            .next()
            .and_then(|stamp| stamp.parse().ok())
            .unwrap_or_else(|| panic!("no time stamp in {line}"));
        (seconds * 1e6) as u64
    };
    (
        time_of("Stopping yametee-worker"),
        time_of("Started yametee-worker"),
    )
}

/// Checks that `inventory add-host` adds a second worker keeping every comment, and that the
/// lab and apply follow: Redis and PostgreSQL open to it alone, nothing else restarts, and
/// verify reports both workers consuming. A new build then rolls out one worker at a time
/// while jobs are pushed, losing none. `inventory remove-host` and apply close the access again.
fn second_worker_joins_and_leaves(dir: &Path) {
    let original = std::fs::read_to_string(repository_inventory()).expect("inventory.yaml");
    let inventory = dir.join("scaled.yaml");
    std::fs::write(&inventory, &original).expect("copying the inventory");
    let worker = worker_binary();
    let added = deploy_with(
        &inventory,
        &worker,
        &[
            "inventory",
            "add-host",
            "worker-2",
            "--address",
            "192.168.120.46",
            "--role",
            "worker",
        ],
    );
    assert_eq!(added.status.code(), Some(0), "add-host failed");
    assert!(
        String::from_utf8_lossy(&added.stdout).contains("+  worker-2:"),
        "add-host printed no diff: {}",
        String::from_utf8_lossy(&added.stdout)
    );
    let edited = std::fs::read_to_string(&inventory).expect("edited inventory");
    for comment in original
        .lines()
        .filter(|line| line.trim_start().starts_with('#'))
    {
        assert!(
            edited.contains(comment),
            "add-host lost the comment {comment:?}"
        );
    }

    let up = deploy_with(&inventory, &worker, &["lab", "up"]);
    assert_eq!(up.status.code(), Some(0), "lab up with worker-2 failed");
    let apply = deploy_with(&inventory, &worker, &["--lab", "--format", "json", "apply"]);
    let report = json(&apply);
    assert_eq!(apply.status.code(), Some(0), "{report:#}");
    for name in ["web", "postgres", "redis", "worker"] {
        assert_eq!(
            host(&report, name)["restarted"],
            serde_json::json!([]),
            "adding worker-2 restarted something on {name}: {report:#}"
        );
    }
    assert_eq!(
        host(&report, "worker-2")["outcome"],
        "changed",
        "{report:#}"
    );
    let expected = vec!["192.168.120.45", "192.168.120.46", "192.168.120.50"];
    assert_eq!(allowed_sources("redis", 6379), expected);
    assert_eq!(allowed_sources("postgres", 5432), expected);

    let (code, report, failed) = verify_failures(&inventory);
    assert_eq!((code, failed), (Some(0), vec![]), "{report:#}");
    let status = deploy_with(
        &inventory,
        &worker,
        &["--lab", "--format", "json", "status"],
    );
    let report_status = json(&status);
    assert_eq!(status.status.code(), Some(0), "{report_status:#}");
    assert_eq!(
        workers_alive(&report_status),
        vec![
            ("yametee-worker@worker".into(), true),
            ("yametee-worker@worker-2".into(), true)
        ]
    );
    let probe = check_detail(&report, "web", "e2e.probe-job");
    for instance in ["yametee-worker@worker ", "yametee-worker@worker-2 "] {
        assert!(probe.contains(instance), "{instance}took no probe: {probe}");
    }

    // A new build (the same binary with a different hash) rolls out while the web host pushes
    // jobs, one every 10 ms.
    let build = dir.join("new-build");
    std::fs::copy(&worker, &build).expect("copying the worker binary");
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&build)
            .unwrap();
        file.write_all(b"a new build").unwrap();
    }
    let processed_before = redis_number(&lab_redis("GET yametee:stats:processed"));
    const JOBS: u64 = 300;
    let pusher = lab_redis_pusher(JOBS);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let rollout = deploy_with(&inventory, &build, &["--lab", "--format", "json", "apply"]);
    let report = json(&rollout);
    assert_eq!(rollout.status.code(), Some(0), "{report:#}");
    for name in ["worker", "worker-2"] {
        assert_eq!(
            host(&report, name)["restarted"],
            serde_json::json!(["yametee-worker.service"]),
            "{report:#}"
        );
    }
    let pushed = pusher.wait_with_output().expect("the pusher ends");
    assert!(pushed.status.success(), "pushing jobs failed");
    let (first, second) = (restart_window("worker"), restart_window("worker-2"));
    assert!(
        first.1 <= second.0 || second.1 <= first.0,
        "both workers were down at once: {first:?} and {second:?}"
    );
    let mut processed = 0;
    for _ in 0..100 {
        processed = redis_number(&lab_redis("GET yametee:stats:processed")) - processed_before;
        if processed >= JOBS {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(processed, JOBS, "jobs processed during the rollout");
    assert_eq!(redis_number(&lab_redis("LLEN yametee:jobs:dead")), 0);
    assert_eq!(redis_number(&lab_redis("ZCARD yametee:jobs:retry")), 0);

    let removed = deploy_with(
        &inventory,
        &worker,
        &["inventory", "remove-host", "worker-2"],
    );
    assert_eq!(removed.status.code(), Some(0), "remove-host failed");
    assert_eq!(
        std::fs::read_to_string(&inventory).unwrap(),
        original,
        "add-host then remove-host should give the file back byte for byte"
    );
    let apply = deploy(&["--lab", "--format", "json", "apply"]);
    let report = json(&apply);
    assert_eq!(apply.status.code(), Some(0), "{report:#}");
    let expected = vec!["192.168.120.45", "192.168.120.50"];
    assert_eq!(allowed_sources("redis", 6379), expected);
    assert_eq!(allowed_sources("postgres", 5432), expected);
    let up = deploy(&["lab", "up"]);
    assert_eq!(up.status.code(), Some(0), "lab up without worker-2 failed");
    assert!(
        !String::from_utf8_lossy(&up.stdout).contains("worker-2"),
        "worker-2 is still in the lab"
    );
}

/// Starts pushing `count` cache:warm jobs from the web host, one every 10 ms, with the lab's
/// Redis password on standard input.
fn lab_redis_pusher(count: u64) -> std::process::Child {
    let script = format!(
        r#"IFS= read -r REDISCLI_AUTH; export REDISCLI_AUTH
i=0
while [ "$i" -lt {count} ]; do
  i=$((i + 1))
  job=$(printf '{{"id":"rollout-%s","type":"cache:warm","data":{{}},"createdAt":"%s"}}' "$i" "$(date -u +%Y-%m-%dT%H:%M:%S.000Z)")
  redis-cli -h 192.168.120.44 RPUSH yametee:jobs "$job" > /dev/null || exit 1
  sleep 0.01
done"#
    );
    spawn_with_redis_password("web", &script)
}

/// Starts `script` on the lab host `host_name` with the lab's Redis password as the first
/// line of its standard input.
fn spawn_with_redis_password(host_name: &str, script: &str) -> std::process::Child {
    use std::io::Write;
    let mut child = deploy_command(
        &repository_inventory(),
        &worker_binary(),
        &["lab", "ssh", host_name, script],
    )
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("yametee-deploy starts");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{}", lab_redis_password()).expect("writing the password");
    child
}
