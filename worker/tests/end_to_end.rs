//! Runs the worker binary against real Redis and PostgreSQL servers that the tests start
//! on 127.0.0.1, and checks what it writes and logs.
//!
//! The tests that need servers print a SKIP banner and pass when redis-server or
//! PostgreSQL is not installed (`apt-get install redis-server postgresql`), except under CI
//! (`CI` set), where they fail.

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use serde_json::Value;
use support::smtp::SmtpServer;
use support::{
    dead_letter, find_server_programs, free_port, host_name, job, push, redis_connection,
    start_servers, wait_until, worker_environment, NotifySocket, RedisServer, WorkerProcess, QUEUE,
};

/// Maximum wait for any single thing the worker is expected to do.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
const STARTUP_LINES: [&str; 5] = [
    "Environment validation passed",
    "Database connection successful",
    "Redis connection successful",
    "Worker yametee-worker started",
    "Worker yametee-worker ready and waiting for jobs",
];

fn assert_startup_lines_in_order(worker: &WorkerProcess) {
    let output = worker.output();
    let mut previous = None;
    for expected in STARTUP_LINES {
        let position = output
            .iter()
            .position(|line| line.contains(expected))
            .unwrap_or_else(|| {
                panic!(
                    "startup line {expected:?} missing; output:\n{}",
                    worker.output_text()
                )
            });
        if let Some((previous_line, previous_position)) = previous {
            assert!(
                position > previous_position,
                "{expected:?} logged before {previous_line:?}; output:\n{}",
                worker.output_text()
            );
        }
        previous = Some((expected, position));
    }
}

fn assert_no_secret_in_output(worker: &WorkerProcess, secrets: &[&str]) {
    let output = worker.output_text();
    for secret in secrets {
        assert!(
            !output.contains(secret),
            "worker output contains the password {secret:?}:\n{output}"
        );
    }
}

fn assert_plain_text(worker: &WorkerProcess) {
    let output = worker.output_text();
    assert!(
        !output.contains('\u{1b}'),
        "worker output has ANSI escapes when piped:\n{output}"
    );
}

#[tokio::test]
async fn invalid_environment_lists_every_problem() {
    let mut worker = WorkerProcess::start(&[
        (
            "DATABASE_URL",
            "mysql://app:topsecret@127.0.0.1/app".to_string(),
        ),
        ("WORKER_CONCURRENCY", "0".to_string()),
        ("WORKER_NAME", "bad name".to_string()),
    ]);

    let status = worker.wait_for_exit(STEP_TIMEOUT).await;
    let output = worker.output_text();

    assert_eq!(status.code(), Some(1), "output:\n{output}");
    assert!(
        output.contains("Invalid environment: DATABASE_URL has scheme \"mysql\""),
        "{output}"
    );
    assert!(
        output.contains("Invalid environment: REDIS_URL is not set"),
        "{output}"
    );
    assert!(
        output.contains("Invalid environment: WORKER_NAME"),
        "{output}"
    );
    assert!(
        output.contains(
            "Invalid environment: WORKER_CONCURRENCY must be a whole number from 1 to 64"
        ),
        "{output}"
    );
    assert!(
        output.contains("Environment validation failed with 4 problem(s)"),
        "{output}"
    );
    assert!(
        !output.contains("Environment validation passed"),
        "{output}"
    );
    assert_no_secret_in_output(&worker, &["topsecret"]);
    assert_plain_text(&worker);
}

#[tokio::test]
async fn unreachable_database_fails_startup() {
    let closed_port = free_port();
    let mut worker = WorkerProcess::start(&[
        (
            "DATABASE_URL",
            format!("postgres://yametee_user:dbsecret@127.0.0.1:{closed_port}/yame_tee"),
        ),
        (
            "REDIS_URL",
            format!("redis://:redissecret@127.0.0.1:{}/0", free_port()),
        ),
    ]);

    let status = worker.wait_for_exit(STEP_TIMEOUT).await;
    let output = worker.output_text();

    assert_ne!(status.code(), Some(0), "output:\n{output}");
    assert!(output.contains("Environment validation passed"), "{output}");
    assert!(output.contains("Database connection failed: "), "{output}");
    assert!(
        !output.contains("Database connection successful"),
        "{output}"
    );
    assert_no_secret_in_output(&worker, &["dbsecret", "redissecret"]);
}

#[tokio::test]
async fn startup_failures_name_the_failing_server() {
    let Some(servers) = start_servers("startup_failures_name_the_failing_server").await else {
        return;
    };

    let wrong_password = servers.postgres.url_with_password("wrong-db-secret");
    let mut worker = WorkerProcess::start(&worker_environment(
        &servers,
        &[("DATABASE_URL", &wrong_password)],
    ));
    let status = worker.wait_for_exit(STEP_TIMEOUT).await;
    let output = worker.output_text();
    assert_ne!(status.code(), Some(0), "output:\n{output}");
    assert!(output.contains("Database connection failed: "), "{output}");
    assert!(
        output.contains("password authentication failed"),
        "{output}"
    );
    assert_no_secret_in_output(&worker, &["wrong-db-secret"]);

    assert_no_secret_in_output(
        &worker,
        &[&servers.redis.password, support::DATABASE_PASSWORD],
    );
}

#[tokio::test]
async fn startup_retries_redis_until_it_answers() {
    let Some(servers) = start_servers("startup_retries_redis_until_it_answers").await else {
        return;
    };
    let programs = find_server_programs().expect("found by start_servers");

    let late_port = free_port();
    let late_redis_url = format!(
        "redis://:{}@127.0.0.1:{late_port}/0",
        servers.redis.password
    );
    let mut worker = WorkerProcess::start(&worker_environment(
        &servers,
        &[("REDIS_URL", &late_redis_url)],
    ));
    worker
        .wait_for_line("Redis connection failed (attempt 2)", STEP_TIMEOUT)
        .await;
    let output = worker.output_text();
    assert!(
        output.contains("Database connection successful"),
        "{output}"
    );
    assert!(!output.contains("ready and waiting for jobs"), "{output}");

    let late_dir = servers.dir.path().join("late-redis");
    std::fs::create_dir(&late_dir).expect("creating the late Redis directory");
    let _late_redis = RedisServer::start_on_port(&programs.redis_server, &late_dir, late_port);
    worker.wait_for_line(STARTUP_LINES[4], STEP_TIMEOUT).await;
    assert_startup_lines_in_order(&worker);
    assert_no_secret_in_output(
        &worker,
        &[&servers.redis.password, support::DATABASE_PASSWORD],
    );

    worker.terminate();
    let status = worker.wait_for_exit(STEP_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "output:\n{}", worker.output_text());
}

#[tokio::test]
async fn worker_processes_every_job_type() {
    let Some(servers) = start_servers("worker_processes_every_job_type").await else {
        return;
    };
    let mut redis = redis_connection(&servers).await;
    let database = &support::connect_postgres(&servers.postgres.url()).await;
    let instance = format!("yametee-worker@{}", host_name());

    // Left behind by a worker that died: an in-flight job without a heartbeat, and a
    // retry that is already due.
    let ghost_job = job("ghost-probe", "verify:probe", "{}");
    let _: i64 = redis
        .rpush(format!("{QUEUE}:inflight:ghost@gone-host"), &ghost_job)
        .await
        .unwrap();
    let due_retry = r#"{"id":"due-retry-probe","type":"verify:probe","data":{},"attempts":1}"#;
    let _: i64 = redis
        .zadd(format!("{QUEUE}:retry"), due_retry, 0)
        .await
        .unwrap();

    let relay = SmtpServer::start().await;
    let relay_url = relay.url();
    let mut worker = WorkerProcess::start(&worker_environment(
        &servers,
        &[
            ("WORKER_CONCURRENCY", "2"),
            ("SMTP_URL", &relay_url),
            ("SMTP_FROM", "shop@example.com"),
        ],
    ));
    worker.wait_for_line(STARTUP_LINES[4], STEP_TIMEOUT).await;
    assert_startup_lines_in_order(&worker);
    let idle_kib = worker.resident_kib();
    eprintln!("worker resident memory when idle: {idle_kib} KiB");
    assert!(
        idle_kib < 50 * 1024,
        "idle worker uses {idle_kib} KiB, more than 50 MiB"
    );

    let migrations: i64 = database
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .expect("schema_migrations exists")
        .get(0);
    assert_eq!(migrations, 2);

    database
        .batch_execute(
            "INSERT INTO orders (id, status) VALUES
                 ('order-pending', 'pending'),
                 ('order-cancelled', 'cancelled'),
                 ('order-slow', 'pending'),
                 ('order-unpaid', 'pending'),
                 ('order-stored', 'pending')",
        )
        .await
        .expect("inserting test orders");

    // Rejected jobs first, so the jobs after them prove that the worker carried on.
    push(&mut redis, "{not json").await;
    push(&mut redis, &job("unknown-1", "report:build", "{}")).await;
    push(
        &mut redis,
        &job(
            "bad-email-1",
            "email:send",
            r#"{"to":"nobody","subject":"s","body":"b"}"#,
        ),
    )
    .await;

    let order_job = job(
        "order-job-1",
        "order:process",
        r#"{"orderId":"order-pending"}"#,
    );
    push(&mut redis, &order_job).await;
    push(
        &mut redis,
        &job(
            "test-123",
            "order:process",
            r#"{"orderId":"test-order-123"}"#,
        ),
    )
    .await;
    push(
        &mut redis,
        &job(
            "order-job-2",
            "order:process",
            r#"{"orderId":"order-cancelled"}"#,
        ),
    )
    .await;
    push(
        &mut redis,
        &job(
            "integration-test",
            "email:send",
            r#"{"to":"test@example.com","subject":"Test","body":"Test email"}"#,
        ),
    )
    .await;
    push(
        &mut redis,
        &job(
            "webhook-1",
            "webhook:process",
            r#"{"source":"payments","event":"payment.succeeded","orderId":"order-unpaid","amount":1200}"#,
        ),
    )
    .await;
    let stored_event: i64 = database
        .query_one(
            "INSERT INTO webhook_events (source, event, payload)
             VALUES ('payments', 'order.cancelled', '{\"orderId\": \"order-stored\"}')
             RETURNING id",
            &[],
        )
        .await
        .expect("storing a webhook event")
        .get(0);
    push(
        &mut redis,
        &job(
            "webhook-stored",
            "webhook:process",
            &format!(r#"{{"eventId":{stored_event}}}"#),
        ),
    )
    .await;
    push(&mut redis, &job("probe-1", "verify:probe", "{}")).await;

    worker
        .wait_for_line(
            "Processing job order-job-1 of type order:process",
            STEP_TIMEOUT,
        )
        .await;
    worker
        .wait_for_line("Order order-pending processed: processed", STEP_TIMEOUT)
        .await;
    let missing_order = wait_until("the dead letter of test-123", STEP_TIMEOUT, || {
        let mut redis = redis.clone();
        async move { dead_letter(&mut redis, |envelope| envelope["job"]["id"] == "test-123").await }
    })
    .await;
    assert_eq!(
        missing_order["reason"], "order test-order-123 does not exist",
        "{missing_order}"
    );
    worker
        .wait_for_line(
            "Order order-cancelled processed: skipped_cancelled",
            STEP_TIMEOUT,
        )
        .await;

    // order:process moved the order and recorded the change.
    let status: String = database
        .query_one("SELECT status FROM orders WHERE id = 'order-pending'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "processed");
    let cancelled: String = database
        .query_one(
            "SELECT status FROM orders WHERE id = 'order-cancelled'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cancelled, "cancelled");

    // email:send delivered the message through the relay and recorded it in the outbox.
    let outbox = wait_until(
        "the sent outbox row of integration-test",
        STEP_TIMEOUT,
        || async move {
            database
                .query_opt(
                    "SELECT recipient, subject, status, attempts, message_id, sent_at IS NOT NULL
                 FROM email_outbox WHERE job_id = 'integration-test' AND status = 'sent'",
                    &[],
                )
                .await
                .unwrap()
        },
    )
    .await;
    assert_eq!(outbox.get::<_, String>(0), "test@example.com");
    assert_eq!(outbox.get::<_, String>(1), "Test");
    assert_eq!(outbox.get::<_, i32>(3), 1);
    let message_id: String = outbox.get(4);
    assert!(outbox.get::<_, bool>(5));
    let delivered = relay.messages();
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0].from, "shop@example.com");
    assert_eq!(delivered[0].to, vec!["test@example.com".to_string()]);
    assert!(delivered[0].data.contains("Subject: Test"), "{delivered:?}");
    assert!(delivered[0].data.contains("Test email"), "{delivered:?}");
    assert!(
        delivered[0].data.contains(&format!("<{message_id}>")),
        "{delivered:?}"
    );

    // webhook:process applied the inline event and the stored one to their orders.
    let webhook = wait_until(
        "the webhook_events row of webhook-1",
        STEP_TIMEOUT,
        || async move {
            database
                .query_opt(
                    "SELECT source, event, payload, result FROM webhook_events
                 WHERE job_id = 'webhook-1' AND processed_at IS NOT NULL",
                    &[],
                )
                .await
                .unwrap()
        },
    )
    .await;
    assert_eq!(
        webhook.get::<_, Option<String>>(0).as_deref(),
        Some("payments")
    );
    assert_eq!(
        webhook.get::<_, Option<String>>(1).as_deref(),
        Some("payment.succeeded")
    );
    assert_eq!(webhook.get::<_, Value>(2)["amount"], 1200);
    assert_eq!(
        webhook.get::<_, Option<String>>(3).as_deref(),
        Some("order order-unpaid paid")
    );
    let stored = wait_until(
        "the stored webhook event applied",
        STEP_TIMEOUT,
        || async move {
            database
                .query_opt(
                    "SELECT job_id, result FROM webhook_events
                 WHERE id = $1 AND processed_at IS NOT NULL",
                    &[&stored_event],
                )
                .await
                .unwrap()
        },
    )
    .await;
    assert_eq!(
        stored.get::<_, Option<String>>(0).as_deref(),
        Some("webhook-stored")
    );
    assert_eq!(
        stored.get::<_, Option<String>>(1).as_deref(),
        Some("order order-stored cancelled")
    );
    for (order, expected) in [("order-unpaid", "paid"), ("order-stored", "cancelled")] {
        let status: String = database
            .query_one("SELECT status FROM orders WHERE id = $1", &[&order])
            .await
            .unwrap()
            .get(0);
        assert_eq!(status, expected, "order {order}");
    }

    // verify:probe wrote its result, and so did the jobs recovered from the dead worker
    // and from the retry set.
    for probe_id in ["probe-1", "ghost-probe", "due-retry-probe"] {
        let key = format!("yametee:probe:{probe_id}");
        let result: String = wait_until(&format!("the probe key {key}"), STEP_TIMEOUT, || {
            let mut redis = redis.clone();
            let key = key.clone();
            async move { redis.get::<_, Option<String>>(&key).await.unwrap() }
        })
        .await;
        let result: Value = serde_json::from_str(&result).expect("probe result is JSON");
        assert_eq!(result["worker"], instance.as_str());
        let picked_up = result["pickedUpUs"]
            .as_i64()
            .expect("pickedUpUs is a number");
        let finished = result["finishedUs"]
            .as_i64()
            .expect("finishedUs is a number");
        let now_us = chrono::Utc::now().timestamp_micros();
        assert!(
            picked_up <= finished && finished <= now_us && now_us - picked_up < 60_000_000,
            "{result}"
        );
        assert_eq!(result.as_object().unwrap().len(), 3, "{result}");
        let ttl: i64 = redis.ttl(&key).await.unwrap();
        assert!((500..=600).contains(&ttl), "probe key TTL {ttl}");
    }
    worker
        .wait_for_line("in-flight job(s) of worker ghost@gone-host", STEP_TIMEOUT)
        .await;

    // Invalid jobs went to the dead letter list with their reasons.
    let invalid = wait_until(
        "the dead letter of the invalid JSON job",
        STEP_TIMEOUT,
        || {
            let mut redis = redis.clone();
            async move { dead_letter(&mut redis, |envelope| envelope["job"] == "{not json").await }
        },
    )
    .await;
    assert!(
        invalid["reason"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{invalid}"
    );
    assert!(invalid["failedAt"].as_str().is_some(), "{invalid}");

    let unknown = wait_until("the dead letter of unknown-1", STEP_TIMEOUT, || {
        let mut redis = redis.clone();
        async move { dead_letter(&mut redis, |envelope| envelope["job"]["id"] == "unknown-1").await }
    })
    .await;
    assert!(
        unknown["reason"]
            .as_str()
            .unwrap()
            .starts_with("unknown job type \"report:build\""),
        "{unknown}"
    );
    assert!(worker.output_text().contains("Job unknown-1 rejected"));

    let bad_email = wait_until("the dead letter of bad-email-1", STEP_TIMEOUT, || {
        let mut redis = redis.clone();
        async move {
            dead_letter(&mut redis, |envelope| {
                envelope["job"]["id"] == "bad-email-1"
            })
            .await
        }
    })
    .await;
    assert!(
        bad_email["reason"]
            .as_str()
            .unwrap()
            .contains("not a valid e-mail address"),
        "{bad_email}"
    );

    // cache:warm computed order counts from PostgreSQL.
    push(&mut redis, &job("cache-1", "cache:warm", "{}")).await;
    let counts_key = format!("{QUEUE}:cache:orders:status_counts");
    let counts: String = wait_until("the order status counts cache entry", STEP_TIMEOUT, || {
        let mut redis = redis.clone();
        let key = counts_key.clone();
        async move { redis.get::<_, Option<String>>(&key).await.unwrap() }
    })
    .await;
    let counts: Value = serde_json::from_str(&counts).unwrap();
    assert_eq!(counts["value"]["processed"], 1, "{counts}");
    assert_eq!(counts["value"]["cancelled"], 2, "{counts}");
    assert_eq!(counts["value"]["paid"], 1, "{counts}");
    assert_eq!(counts["value"]["pending"], 1, "{counts}");
    let ttl: i64 = redis.ttl(&counts_key).await.unwrap();
    assert!((1..=300).contains(&ttl), "cache TTL {ttl}");
    let summary: String = redis
        .get(format!("{QUEUE}:cache:orders:summary"))
        .await
        .unwrap();
    let summary: Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(summary["value"]["totalOrders"], 5, "{summary}");
    assert_eq!(summary["value"]["processedOrders"], 1, "{summary}");

    // A job delivered again applies nothing twice.
    push(&mut redis, &order_job).await;
    worker
        .wait_for_line("Job order-job-1 was already processed", STEP_TIMEOUT)
        .await;
    let events: i64 = database
        .query_one(
            "SELECT count(*) FROM order_events WHERE order_id = 'order-pending'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 1);

    // A failing job goes to the retry set with its attempt count, and succeeds once it
    // is due again and the database is back.
    database
        .batch_execute("ALTER TABLE email_outbox RENAME TO email_outbox_hidden")
        .await
        .unwrap();
    push(
        &mut redis,
        &job(
            "email-retry",
            "email:send",
            r#"{"to":"retry@example.com","subject":"Again","body":"b"}"#,
        ),
    )
    .await;
    let retry_entry: String = wait_until("email-retry in the retry set", STEP_TIMEOUT, || {
        let mut redis = redis.clone();
        async move {
            let entries: Vec<String> = redis.zrange(format!("{QUEUE}:retry"), 0, -1).await.unwrap();
            entries
                .into_iter()
                .find(|entry| entry.contains("email-retry"))
        }
    })
    .await;
    let retried: Value = serde_json::from_str(&retry_entry).unwrap();
    assert_eq!(retried["attempts"], 1, "{retried}");
    assert!(
        retried["lastError"]
            .as_str()
            .unwrap()
            .contains("email_outbox"),
        "{retried}"
    );
    let output = worker.output_text();
    let retry_line = output
        .lines()
        .find(|line| line.contains("Job email-retry failed (attempt 1 of 5), retrying in "))
        .unwrap_or_else(|| panic!("no retry line for email-retry:\n{output}"));
    assert!(
        [
            "retrying in 5 s",
            "retrying in 6 s",
            "retrying in 7 s",
            "retrying in 8 s",
            "retrying in 9 s",
            "retrying in 10 s"
        ]
        .iter()
        .any(|delay| retry_line.contains(delay)),
        "the first retry waits 5 to 10 s: {retry_line}"
    );

    database
        .batch_execute("ALTER TABLE email_outbox_hidden RENAME TO email_outbox")
        .await
        .unwrap();
    let _: i64 = redis
        .zadd(format!("{QUEUE}:retry"), &retry_entry, 0)
        .await
        .unwrap();
    wait_until(
        "the outbox row of email-retry",
        STEP_TIMEOUT,
        || async move {
            database
                .query_opt(
                    "SELECT 1 FROM email_outbox WHERE job_id = 'email-retry'",
                    &[],
                )
                .await
                .unwrap()
        },
    )
    .await;

    // Everything fetched has left the queue and the in-flight list.
    let inflight_key = format!("{QUEUE}:inflight:{instance}");
    wait_until("an empty queue and in-flight list", STEP_TIMEOUT, || {
        let mut redis = redis.clone();
        let inflight_key = inflight_key.clone();
        async move {
            let queued: i64 = redis.llen(QUEUE).await.unwrap();
            let inflight: i64 = redis.llen(&inflight_key).await.unwrap();
            (queued == 0 && inflight == 0).then_some(())
        }
    })
    .await;

    // Counters: three probes and the orders completed; the rejected jobs, the missing
    // order and the first email-retry attempt failed.
    let counter = |key: &'static str| {
        let mut redis = redis.clone();
        async move { redis.get::<_, Option<i64>>(key).await.unwrap().unwrap_or(0) }
    };
    assert_eq!(counter("yametee:stats:processed:verify:probe").await, 3);
    assert_eq!(counter("yametee:stats:processed:email:send").await, 2);
    assert!(counter("yametee:stats:processed").await >= 10);
    assert_eq!(counter("yametee:stats:failed:order:process").await, 1);
    assert_eq!(counter("yametee:stats:failed:email:send").await, 2);
    assert_eq!(counter("yametee:stats:failed").await, 5);

    // The per-minute counters add up to the totals, and each expires.
    let mut stats = redis.clone();
    for (prefix, total) in [
        ("yametee:stats:minute:processed:", "yametee:stats:processed"),
        ("yametee:stats:minute:failed:", "yametee:stats:failed"),
    ] {
        let minute_keys: Vec<String> = stats.keys(format!("{prefix}*")).await.unwrap();
        assert!(!minute_keys.is_empty(), "no key matches {prefix}*");
        let mut sum = 0;
        for key in &minute_keys {
            let value: i64 = stats.get(key).await.unwrap();
            sum += value;
            let ttl: i64 = stats.ttl(key).await.unwrap();
            assert!(ttl > 0, "{key} has TTL {ttl}");
            assert!(ttl <= 3600, "{key} has TTL {ttl}");
        }
        assert_eq!(sum, counter(total).await, "{prefix}* against {total}");
    }

    let heartbeat_ttl: i64 = redis
        .ttl(format!("yametee:workers:{instance}"))
        .await
        .unwrap();
    assert!(
        (1..=15).contains(&heartbeat_ttl),
        "heartbeat TTL {heartbeat_ttl}"
    );

    let resident_kib = worker.resident_kib();
    eprintln!("worker resident memory after the jobs: {resident_kib} KiB");
    assert!(
        resident_kib < 50 * 1024,
        "worker uses {resident_kib} KiB, more than 50 MiB"
    );

    assert_no_secret_in_output(
        &worker,
        &[&servers.redis.password, support::DATABASE_PASSWORD],
    );
    assert_plain_text(&worker);

    // SIGTERM lets a running job finish: the job waits on a row lock held here, which is
    // released after the signal.
    let locker = support::connect_postgres(&servers.postgres.url()).await;
    locker
        .batch_execute("BEGIN; SELECT * FROM orders WHERE id = 'order-slow' FOR UPDATE")
        .await
        .unwrap();
    push(
        &mut redis,
        &job("slow-1", "order:process", r#"{"orderId":"order-slow"}"#),
    )
    .await;
    worker
        .wait_for_line("Processing job slow-1", STEP_TIMEOUT)
        .await;

    worker.terminate();
    worker.wait_for_line("Received SIGTERM", STEP_TIMEOUT).await;
    worker
        .wait_for_line(
            "Waiting up to 30 s for 1 running job(s) to finish",
            STEP_TIMEOUT,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    locker.batch_execute("COMMIT").await.unwrap();

    let status = worker.wait_for_exit(STEP_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "output:\n{}", worker.output_text());
    worker
        .wait_for_line("Order order-slow processed: processed", Duration::ZERO)
        .await;
    worker
        .wait_for_line("All running jobs finished", Duration::ZERO)
        .await;
    worker
        .wait_for_line("Worker yametee-worker stopped", Duration::ZERO)
        .await;

    let heartbeat_exists: bool = redis
        .exists(format!("yametee:workers:{instance}"))
        .await
        .unwrap();
    assert!(!heartbeat_exists, "heartbeat key left after shutdown");
    let inflight: i64 = redis.llen(&inflight_key).await.unwrap();
    assert_eq!(inflight, 0);
}

#[tokio::test]
async fn shutdown_returns_unfinished_jobs_after_drain_timeout() {
    let Some(servers) = start_servers("shutdown_returns_unfinished_jobs_after_drain_timeout").await
    else {
        return;
    };
    let mut redis = redis_connection(&servers).await;
    let environment = worker_environment(
        &servers,
        &[
            ("WORKER_NAME", "drain-worker"),
            ("WORKER_DRAIN_TIMEOUT_SECS", "1"),
        ],
    );

    let mut worker = WorkerProcess::start(&environment);
    worker
        .wait_for_line(
            "Worker drain-worker ready and waiting for jobs",
            STEP_TIMEOUT,
        )
        .await;

    let database = support::connect_postgres(&servers.postgres.url()).await;
    database
        .batch_execute("INSERT INTO orders (id, status) VALUES ('order-stuck', 'pending')")
        .await
        .unwrap();
    let locker = support::connect_postgres(&servers.postgres.url()).await;
    locker
        .batch_execute("BEGIN; SELECT * FROM orders WHERE id = 'order-stuck' FOR UPDATE")
        .await
        .unwrap();

    let stuck_job = job("stuck-1", "order:process", r#"{"orderId":"order-stuck"}"#);
    push(&mut redis, &stuck_job).await;
    worker
        .wait_for_line("Processing job stuck-1", STEP_TIMEOUT)
        .await;

    worker.terminate();
    let status = worker.wait_for_exit(STEP_TIMEOUT).await;
    let output = worker.output_text();
    assert_eq!(status.code(), Some(0), "output:\n{output}");
    assert!(
        output.contains("1 job(s) did not finish within the drain timeout of 1 s"),
        "{output}"
    );
    assert!(
        output.contains("Returned 1 unfinished job(s) to the queue"),
        "{output}"
    );

    let queued: Vec<String> = redis.lrange(QUEUE, 0, -1).await.unwrap();
    assert_eq!(queued, vec![stuck_job.clone()]);
    let status: String = database
        .query_one("SELECT status FROM orders WHERE id = 'order-stuck'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status, "pending",
        "the stopped job's transaction must roll back"
    );

    // The returned job runs to completion on the next start.
    locker.batch_execute("ROLLBACK").await.unwrap();
    let mut worker = WorkerProcess::start(&environment);
    worker
        .wait_for_line("Order order-stuck processed: processed", STEP_TIMEOUT)
        .await;
    worker.terminate();
    let status = worker.wait_for_exit(STEP_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "output:\n{}", worker.output_text());
}

#[tokio::test]
async fn systemd_notifications_bracket_the_run() {
    let Some(servers) = start_servers("systemd_notifications_bracket_the_run").await else {
        return;
    };
    let notify = NotifySocket::bind(servers.dir.path());
    let mut environment = worker_environment(&servers, &[]);
    environment.push(("NOTIFY_SOCKET", notify.path.display().to_string()));

    let mut worker = WorkerProcess::start(&environment);
    let ready = notify
        .receive(STEP_TIMEOUT)
        .expect("a notification before the timeout");
    assert!(
        ready.lines().any(|line| line == "READY=1"),
        "first notification: {ready:?}"
    );
    // The worker logs the ready line before it notifies, but the line travels through a pipe
    // that the test reads on another thread, so it may arrive a moment after READY=1.
    worker.wait_for_line(STARTUP_LINES[4], STEP_TIMEOUT).await;

    worker.terminate();
    let stopping = notify
        .receive(STEP_TIMEOUT)
        .expect("a notification before the timeout");
    assert!(
        stopping.lines().any(|line| line == "STOPPING=1"),
        "notification after SIGTERM: {stopping:?}"
    );
    let status = worker.wait_for_exit(STEP_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "output:\n{}", worker.output_text());
}

#[tokio::test]
async fn worker_resumes_after_redis_restart() {
    let Some(mut servers) = start_servers("worker_resumes_after_redis_restart").await else {
        return;
    };
    let mut worker = WorkerProcess::start(&worker_environment(&servers, &[]));
    worker.wait_for_line(STARTUP_LINES[4], STEP_TIMEOUT).await;

    servers.redis.restart(Duration::from_secs(1));
    worker
        .wait_for_line(
            "Redis connection failed while fetching jobs (attempt 1 of 12)",
            STEP_TIMEOUT,
        )
        .await;
    worker
        .wait_for_line("Redis connection re-established", STEP_TIMEOUT)
        .await;

    let mut redis = redis_connection(&servers).await;
    push(&mut redis, &job("after-restart", "verify:probe", "{}")).await;
    let key = "yametee:probe:after-restart";
    wait_until(
        "the probe key written after the Redis restart",
        STEP_TIMEOUT,
        || {
            let mut redis = redis.clone();
            async move { redis.get::<_, Option<String>>(key).await.unwrap() }
        },
    )
    .await;

    // The heartbeat key, lost with the old server's data, is written again.
    let heartbeat_key = format!("yametee:workers:yametee-worker@{}", host_name());
    wait_until(
        "the heartbeat key after the Redis restart",
        STEP_TIMEOUT,
        || {
            let mut redis = redis.clone();
            let heartbeat_key = heartbeat_key.clone();
            async move {
                redis
                    .exists::<_, bool>(&heartbeat_key)
                    .await
                    .unwrap()
                    .then_some(())
            }
        },
    )
    .await;

    worker.terminate();
    let status = worker.wait_for_exit(STEP_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "output:\n{}", worker.output_text());
}
