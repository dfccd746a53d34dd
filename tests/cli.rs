//! The real binary on local files: inventory validation, offline rendering and the errors a
//! user sees before any connection is made. No network.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_yametee-deploy"))
}

fn repository_inventory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("inventory.yaml")
}

fn run(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env_remove("YAMETEE_PG_PASSWORD")
        .env_remove("YAMETEE_REDIS_PASSWORD")
        .env_remove("YAMETEE_INVENTORY")
        .output()
        .expect("yametee-deploy runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn inventory_check_accepts_repository_inventory() {
    let inventory = repository_inventory();
    let output = run(&["-i", inventory.to_str().unwrap(), "inventory", "check"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("valid, 4 hosts (web, postgres, redis, worker)"));
}

#[test]
fn inventory_check_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.yaml");
    std::fs::write(
        &path,
        "app:\n  database:\n    name: yame_tee\n    user: yametee_user\n    password: plain-text\n  redis:\n    password: {env: REDIS_PW}\nhosts:\n  worker:\n    address: 10.0.0.300\n    roles: [worker]\n",
    )
    .unwrap();
    let output = run(&["-i", path.to_str().unwrap(), "inventory", "check"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("inventory.yaml:5:15: app.database.password must be a secret reference"),
        "{stderr}"
    );
    assert!(
        stderr.contains("inventory.yaml:10:14: invalid hosts.worker.address `10.0.0.300`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("no host has the role `postgres`"),
        "{stderr}"
    );
    assert!(stderr.contains("no host has the role `redis`"), "{stderr}");
}

#[test]
fn render_writes_each_hosts_files() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = repository_inventory();
    let output = run(&[
        "-i",
        inventory.to_str().unwrap(),
        "render",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));

    let env_file =
        std::fs::read_to_string(dir.path().join("worker/etc/yametee-worker/worker.env")).unwrap();
    assert!(
        env_file.contains("REDIS_URL=redis://:<secret:app.redis.password>@192.168.120.44:6379/0"),
        "{env_file}"
    );
    let hba = std::fs::read_to_string(
        dir.path()
            .join("postgres/etc/postgresql/15/main/pg_hba.conf"),
    )
    .unwrap();
    assert!(hba.contains("192.168.120.45/32"), "{hba}");
    assert!(dir.path().join("redis/etc/redis/yametee.conf").exists());
    assert!(dir.path().join("web/etc/yametee/ufw.rules").exists());
}

#[test]
fn missing_secret_names_the_variable() {
    let inventory = repository_inventory();
    let output = run(&["-i", inventory.to_str().unwrap(), "plan"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("environment variable YAMETEE_"), "{stderr}");
    assert!(stderr.contains("is not set"), "{stderr}");
}

#[test]
fn unknown_limit_host_is_usage_error() {
    let inventory = repository_inventory();
    let output = run(&[
        "-i",
        inventory.to_str().unwrap(),
        "--limit",
        "worker,nope",
        "render",
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown host in --limit: nope"), "{stderr}");
}

#[test]
fn help_documents_exit_codes() {
    let output = run(&["--help"]);
    let stdout = text(&output.stdout);
    assert!(stdout.contains("Exit codes:"), "{stdout}");
    assert!(stdout.contains("--detailed-exitcode"), "{stdout}");
}

#[test]
fn fatal_error_is_json_document() {
    let inventory = repository_inventory();
    let output = run(&[
        "-i",
        inventory.to_str().unwrap(),
        "--format",
        "json",
        "plan",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    assert_eq!(document["ok"], false);
    assert!(
        document["error"].as_str().unwrap().contains("is not set"),
        "{document}"
    );
}

#[test]
fn invalid_inventory_problems_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.yaml");
    std::fs::write(&path, "hosts: {}\n").unwrap();
    let output = run(&[
        "-i",
        path.to_str().unwrap(),
        "--format",
        "json",
        "inventory",
        "check",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    assert_eq!(document["ok"], false);
    let problems = document["problems"].as_array().expect("problems");
    assert_eq!(problems.len(), 2, "{document}");
    assert_eq!(problems[0]["line"], 1);
    assert!(
        problems[0]["message"]
            .as_str()
            .unwrap()
            .contains("missing key `app`"),
        "{document}"
    );
}

#[test]
fn limited_render_keeps_other_hosts_access() {
    let inventory = repository_inventory();
    let output = run(&[
        "-i",
        inventory.to_str().unwrap(),
        "--limit",
        "postgres",
        "--format",
        "json",
        "render",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    let files = document["files"].as_array().expect("files");
    assert!(
        files.iter().all(|file| file["host"] == "postgres"),
        "{document}"
    );
    let hba = files
        .iter()
        .find(|file| file["path"].as_str().unwrap().ends_with("pg_hba.conf"))
        .expect("pg_hba");
    let content = hba["content"].as_str().unwrap();
    assert!(content.contains("192.168.120.45/32"), "{content}");
    assert!(content.contains("192.168.120.50/32"), "{content}");
}

fn run_with_secrets(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env("YAMETEE_PG_PASSWORD", "unused-here")
        .env("YAMETEE_REDIS_PASSWORD", "unused-here")
        .env_remove("YAMETEE_INVENTORY")
        .output()
        .expect("yametee-deploy runs")
}

#[test]
fn job_push_rejects_unknown_type() {
    let inventory = repository_inventory();
    let output = run_with_secrets(&[
        "-i",
        inventory.to_str().unwrap(),
        "job",
        "push",
        "order:cancel",
        "{}",
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unknown job type `order:cancel`"),
        "{stderr}"
    );
    assert!(stderr.contains("order:process, email:send"), "{stderr}");
}

#[test]
fn job_push_rejects_invalid_data() {
    let inventory = repository_inventory();
    for data in ["{orderId: 1}", "[1, 2]"] {
        let output = run_with_secrets(&[
            "-i",
            inventory.to_str().unwrap(),
            "job",
            "push",
            "order:process",
            data,
        ]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{data}: {stderr}");
        assert!(stderr.contains("invalid job data"), "{data}: {stderr}");
    }
}

#[test]
fn status_rejects_junit_format() {
    let inventory = repository_inventory();
    let output = run_with_secrets(&[
        "-i",
        inventory.to_str().unwrap(),
        "--format",
        "junit",
        "status",
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("status has no junit format"), "{stderr}");
}

#[test]
fn status_interval_needs_watch() {
    let inventory = repository_inventory();
    let output = run_with_secrets(&[
        "-i",
        inventory.to_str().unwrap(),
        "status",
        "--interval",
        "5",
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--watch"), "{stderr}");
}

#[test]
fn status_without_worker_host_is_usage_error() {
    // Rejected before any connection: the selection has no worker host to read Redis from.
    let inventory = repository_inventory();
    let output = run_with_secrets(&[
        "-i",
        inventory.to_str().unwrap(),
        "--limit",
        "web",
        "status",
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no worker host is selected"), "{stderr}");
    assert!(
        stderr.contains("hint: select one with --limit, such as --limit worker"),
        "{stderr}"
    );
}
