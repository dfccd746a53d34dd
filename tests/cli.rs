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
fn missing_secrets_name_every_variable() {
    let inventory = repository_inventory();
    let output = run(&["-i", inventory.to_str().unwrap(), "plan"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "environment variables YAMETEE_PG_PASSWORD, YAMETEE_REDIS_PASSWORD are not set"
        ),
        "{stderr}"
    );

    let only_redis_missing = Command::new(binary())
        .args(["-i", inventory.to_str().unwrap(), "plan"])
        .env("YAMETEE_PG_PASSWORD", "set-here")
        .env_remove("YAMETEE_REDIS_PASSWORD")
        .output()
        .expect("yametee-deploy runs");
    let stderr = text(&only_redis_missing.stderr);
    assert!(
        stderr.contains("environment variable YAMETEE_REDIS_PASSWORD is not set"),
        "{stderr}"
    );
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
        document["error"].as_str().unwrap().contains("are not set"),
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

/// Copies the repository's inventory into a temporary directory, for commands that edit it.
fn inventory_copy() -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.yaml");
    let original = std::fs::read_to_string(repository_inventory()).unwrap();
    std::fs::write(&path, &original).unwrap();
    (dir, path, original)
}

/// Runs `inventory add-host worker-2` on the inventory at `path`.
fn add_worker_2(path: &Path) -> Output {
    run(&[
        "-i",
        path.to_str().unwrap(),
        "inventory",
        "add-host",
        "worker-2",
        "--address",
        "192.168.120.46",
        "--role",
        "worker",
    ])
}

#[test]
fn add_host_appends_worker_2() {
    let (_dir, path, original) = inventory_copy();
    let output = add_worker_2(&path);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");

    let edited = std::fs::read_to_string(&path).unwrap();
    let prefix = if original.ends_with('\n') { "" } else { "\n" };
    let expected = format!(
        "{original}{prefix}  worker-2:\n    address: 192.168.120.46\n    roles: [worker]\n"
    );
    assert_eq!(edited, expected);

    let diff = text(&output.stdout);
    assert!(diff.contains("\n+  worker-2:\n"), "{diff}");
    assert!(diff.contains("\n+    address: 192.168.120.46\n"), "{diff}");
    assert!(!diff.contains("\n-"), "only additions: {diff}");

    let check = run(&["-i", path.to_str().unwrap(), "inventory", "check"]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
    assert!(
        text(&check.stdout).contains("5 hosts"),
        "{}",
        text(&check.stdout)
    );
}

#[test]
fn remove_host_deletes_its_block() {
    let (_dir, path, original) = inventory_copy();
    let added = add_worker_2(&path);
    assert_eq!(added.status.code(), Some(0), "{}", text(&added.stderr));

    let output = run(&[
        "-i",
        path.to_str().unwrap(),
        "inventory",
        "remove-host",
        "worker-2",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let diff = text(&output.stdout);
    assert!(diff.contains("\n-  worker-2:\n"), "{diff}");
    let edited = std::fs::read_to_string(&path).unwrap();
    assert_eq!(edited.trim_end(), original.trim_end());
}

#[test]
fn set_replaces_value_in_place() {
    let (_dir, path, original) = inventory_copy();
    let output = run(&[
        "-i",
        path.to_str().unwrap(),
        "inventory",
        "set",
        "app.worker.concurrency",
        "8",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let edited = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        edited,
        original.replace("    concurrency: 4\n", "    concurrency: 8\n")
    );
    let diff = text(&output.stdout);
    assert!(
        diff.contains("\n-    concurrency: 4\n+    concurrency: 8\n"),
        "{diff}"
    );
}

#[test]
fn rejected_edits_exit_2_and_leave_file() {
    let (_dir, path, original) = inventory_copy();
    let path_arg = path.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "add-host",
                "worker-2",
                "--address",
                "192.168.120.45",
                "--role",
                "worker",
            ],
            "is already the address of host `worker`",
        ),
        (
            &[
                "add-host",
                "worker",
                "--address",
                "192.168.120.46",
                "--role",
                "worker",
            ],
            "host `worker` already exists",
        ),
        (
            &["remove-host", "postgres"],
            "no host has the role `postgres`",
        ),
        (
            &["set", "hosts.worker.adress", "192.168.120.46"],
            "did you mean `address`?",
        ),
        (
            &["set", "app.worker.concurrency", "0"],
            "expected a whole number from 1 to 64",
        ),
    ];
    for (args, expected) in cases {
        let mut full = vec!["-i", path_arg, "inventory"];
        full.extend_from_slice(args);
        let output = run(&full);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(stderr.contains("was not changed"), "{args:?}: {stderr}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            original,
            "{args:?}"
        );
    }
    let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
    assert_eq!(leftovers, 1, "no temporary file is left behind");
}

#[test]
fn dry_run_prints_diff_writes_nothing() {
    let (_dir, path, original) = inventory_copy();
    let path_arg = path.to_str().unwrap();
    let cases: [&[&str]; 3] = [
        &[
            "add-host",
            "worker-2",
            "--address",
            "192.168.120.46",
            "--role",
            "worker",
            "--dry-run",
        ],
        &["remove-host", "worker", "--dry-run"],
        &["set", "app.queue", "yametee:jobs:v2", "--dry-run"],
    ];
    for args in cases {
        let mut full = vec!["-i", path_arg, "inventory"];
        full.extend_from_slice(args);
        let output = run(&full);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&output.stderr)
        );
        let diff = text(&output.stdout);
        assert!(diff.starts_with("--- "), "{args:?}: {diff}");
        assert!(
            text(&output.stderr).contains("not written (--dry-run)"),
            "{args:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            original,
            "{args:?}"
        );
    }
}

#[test]
fn edit_result_as_json() {
    let (_dir, path, original) = inventory_copy();
    let output = run(&[
        "-i",
        path.to_str().unwrap(),
        "--format",
        "json",
        "inventory",
        "set",
        "app.thresholds.dead",
        "5",
        "--dry-run",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    assert_eq!(document["ok"], true);
    assert_eq!(document["changed"], true);
    assert_eq!(document["written"], false);
    let diff = document["diff"].as_str().unwrap();
    assert!(diff.contains("+    dead: 5\n"), "{document}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), original);
}

#[test]
fn inventory_show_formats() {
    let inventory = repository_inventory();
    let human = run(&["-i", inventory.to_str().unwrap(), "inventory", "show"]);
    assert_eq!(human.status.code(), Some(0), "{}", text(&human.stderr));
    let summary = text(&human.stdout);
    assert!(summary.starts_with("HOST "), "{summary}");
    assert!(
        summary.contains("worker    192.168.120.45  worker    deploy, port 22, sudo\n"),
        "{summary}"
    );
    assert!(
        summary.contains("password from environment variable YAMETEE_PG_PASSWORD"),
        "{summary}"
    );

    let json = run(&[
        "-i",
        inventory.to_str().unwrap(),
        "--format",
        "json",
        "inventory",
        "show",
    ]);
    assert_eq!(json.status.code(), Some(0), "{}", text(&json.stderr));
    let document: serde_json::Value = serde_json::from_slice(&json.stdout).expect("stdout is JSON");
    assert_eq!(document["hosts"][3]["name"], "worker");
    assert_eq!(document["hosts"][3]["ssh"]["port"], 22);
    assert_eq!(
        document["app"]["database"]["password"]["env"],
        "YAMETEE_PG_PASSWORD"
    );
}

#[test]
fn inventory_check_suggests_key() {
    let (_dir, path, original) = inventory_copy();
    let misspelt = original.replace("    address: 192.168.120.50", "    adress: 192.168.120.50");
    std::fs::write(&path, misspelt).unwrap();
    let output = run(&["-i", path.to_str().unwrap(), "inventory", "check"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unknown key `adress` in hosts.web; did you mean `address`?"),
        "{stderr}"
    );
}

/// Runs `status` with `args` on the repository's inventory and returns its standard error,
/// checking it was refused as a usage error (exit code 2).
fn status_usage_error(args: &[&str]) -> String {
    let inventory = repository_inventory();
    let mut all = vec!["-i", inventory.to_str().unwrap()];
    all.extend_from_slice(args);
    let output = run_with_secrets(&all);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    stderr
}

#[test]
fn status_rejects_junit_format() {
    let stderr = status_usage_error(&["--format", "junit", "status"]);
    assert!(stderr.contains("status has no junit format"), "{stderr}");
}

#[test]
fn status_interval_needs_watch() {
    let stderr = status_usage_error(&["status", "--interval", "5"]);
    assert!(stderr.contains("--watch"), "{stderr}");
}

#[test]
fn status_without_worker_host_is_usage_error() {
    // Rejected before any connection: the selection has no worker host to read Redis from.
    let stderr = status_usage_error(&["--limit", "web", "status"]);
    assert!(stderr.contains("no worker host is selected"), "{stderr}");
    assert!(
        stderr.contains("hint: select one with --limit, such as --limit worker"),
        "{stderr}"
    );
}

#[test]
fn empty_limit_is_usage_error() {
    // An unset variable in `--limit "$HOSTS"` must not select nothing and pass.
    let inventory = repository_inventory();
    for limit in ["", ","] {
        let output = run_with_secrets(&[
            "-i",
            inventory.to_str().unwrap(),
            "--limit",
            limit,
            "verify",
        ]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "--limit {limit:?}: {stderr}");
        assert!(stderr.contains("--limit names no host"), "{stderr}");
    }
}

#[test]
fn status_needs_only_the_redis_password() {
    // Without the database password, status gets past its secrets to the host selection.
    let inventory = repository_inventory();
    let output = Command::new(binary())
        .args([
            "-i",
            inventory.to_str().unwrap(),
            "--limit",
            "web",
            "status",
        ])
        .env_remove("YAMETEE_PG_PASSWORD")
        .env("YAMETEE_REDIS_PASSWORD", "unused-here")
        .env_remove("YAMETEE_INVENTORY")
        .output()
        .expect("yametee-deploy runs");
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no worker host is selected"), "{stderr}");
    assert!(!stderr.contains("YAMETEE_PG_PASSWORD"), "{stderr}");
}

#[test]
fn detailed_exitcode_errors_exit_1() {
    // 2 means "changes pending" here, so no error may exit 2, not even a usage error.
    let missing = run(&[
        "-i",
        "/nonexistent/inventory.yaml",
        "plan",
        "--detailed-exitcode",
    ]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing.stderr));
    let unknown = run(&["plan", "--detailed-exitcode", "--no-such-option"]);
    assert_eq!(unknown.status.code(), Some(1), "{}", text(&unknown.stderr));
    let plain = run(&["-i", "/nonexistent/inventory.yaml", "plan"]);
    assert_eq!(plain.status.code(), Some(2), "{}", text(&plain.stderr));
}

#[test]
fn command_line_error_is_a_json_document() {
    let output = run(&["--format", "json", "verify", "--no-such-option"]);
    assert_eq!(output.status.code(), Some(2));
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("stdout is a JSON document");
    assert_eq!(document["ok"], false);
    assert!(
        document["error"]
            .as_str()
            .unwrap()
            .contains("--no-such-option"),
        "{document}"
    );
}
