//! Runs the worker binary through crashes, cut connections, a database outage, poison
//! jobs, a shutdown mid-run and a second worker, against Redis, PostgreSQL and SMTP
//! servers that the tests start on 127.0.0.1, and counts that every job was done once.
//!
//! Like `end_to_end.rs`, the tests print a SKIP banner and pass when redis-server or
//! PostgreSQL is not installed, except under CI (`CI` set), where they fail.

mod support;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::Value;
use support::smtp::SmtpServer;
use support::{
    connect_postgres, dead_letter, job, push, redis_connection, start_servers, wait_until,
    worker_environment, WorkerProcess, QUEUE,
};

/// Maximum wait for any single thing the worker is expected to do.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// Maximum wait for a whole run of jobs to drain, retries included. The first retry of
/// a failed job comes 5 to 10 s after its failure.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const READY_LINE: &str = "ready and waiting for jobs";

type Redis = redis::aio::MultiplexedConnection;

/// Returns a run of probe jobs with one `order:process` job in every ten, for the orders
/// `<prefix>-order-<n>`.
fn mixed_jobs(prefix: &str, count: usize) -> (Vec<String>, usize) {
    let mut jobs = Vec::with_capacity(count);
    let mut orders = 0;
    for index in 0..count {
        if index % 10 == 0 {
            let data = format!(r#"{{"orderId":"{prefix}-order-{orders}"}}"#);
            jobs.push(job(
                &format!("{prefix}-order-job-{orders}"),
                "order:process",
                &data,
            ));
            orders += 1;
        } else {
            jobs.push(job(
                &format!("{prefix}-probe-{index}"),
                "verify:probe",
                "{}",
            ));
        }
    }
    (jobs, orders)
}

fn probe_ids(prefix: &str, count: usize) -> Vec<String> {
    (0..count)
        .filter(|index| index % 10 != 0)
        .map(|index| format!("{prefix}-probe-{index}"))
        .collect()
}

async fn insert_pending_orders(database: &tokio_postgres::Client, prefix: &str, count: usize) {
    let count = i32::try_from(count).expect("order count fits in i32");
    database
        .execute(
            "INSERT INTO orders (id, status)
             SELECT $1 || '-order-' || n, 'pending' FROM generate_series(0, $2 - 1) AS n",
            &[&prefix, &count],
        )
        .await
        .expect("inserting pending orders");
}

/// Puts every job on the queue at once: the jobs go to a side list first, which is then
/// renamed onto the empty queue.
async fn fill_queue(redis: &mut Redis, jobs: &[String]) {
    let queued: i64 = redis.llen(QUEUE).await.unwrap();
    assert_eq!(
        queued, 0,
        "fill_queue needs an empty queue, because RENAME replaces it"
    );

    let staging = format!("{QUEUE}:test-staging");
    for chunk in jobs.chunks(5_000) {
        let _: i64 = redis.rpush(&staging, chunk).await.unwrap();
    }
    let _: () = redis.rename(&staging, QUEUE).await.unwrap();
}

async fn counter(redis: &mut Redis, key: &str) -> i64 {
    redis.get::<_, Option<i64>>(key).await.unwrap().unwrap_or(0)
}

/// Returns the total length of every in-flight list.
async fn inflight_total(redis: &mut Redis) -> i64 {
    let keys: Vec<String> = redis.keys(format!("{QUEUE}:inflight:*")).await.unwrap();
    let mut total = 0;
    for key in keys {
        total += redis.llen::<_, i64>(&key).await.unwrap();
    }
    total
}

/// Waits until the queue, every in-flight list and the retry set are empty.
async fn wait_for_drain(redis: &Redis) {
    wait_until(
        "an empty queue, in-flight lists and retry set",
        DRAIN_TIMEOUT,
        || {
            let mut redis = redis.clone();
            async move {
                let queued: i64 = redis.llen(QUEUE).await.unwrap();
                let retries: i64 = redis.zcard(format!("{QUEUE}:retry")).await.unwrap();
                let inflight = inflight_total(&mut redis).await;
                (queued == 0 && retries == 0 && inflight == 0).then_some(())
            }
        },
    )
    .await;
}

/// Counts how many of the probe results for `ids` exist.
async fn existing_probe_results(redis: &mut Redis, ids: &[String]) -> usize {
    let mut existing = 0;
    for chunk in ids.chunks(1_000) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|id| format!("yametee:probe:{id}"))
            .collect();
        let count: usize = redis::cmd("EXISTS")
            .arg(&keys)
            .query_async(redis)
            .await
            .unwrap();
        existing += count;
    }
    existing
}

/// Checks that each of the `count` orders was processed by exactly one job.
async fn assert_orders_processed_once(
    database: &tokio_postgres::Client,
    prefix: &str,
    count: usize,
) {
    let pattern = format!("{prefix}-order-%");
    let count = i64::try_from(count).unwrap();
    let query = |sql: &'static str| {
        let pattern = pattern.clone();
        async move {
            database
                .query_one(sql, &[&pattern])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };

    let processed =
        query("SELECT count(*) FROM orders WHERE id LIKE $1 AND status = 'processed'").await;
    assert_eq!(processed, count, "orders {pattern} in status processed");
    let events = query("SELECT count(*) FROM order_events WHERE order_id LIKE $1").await;
    assert_eq!(events, count, "status changes of orders {pattern}");
    let distinct =
        query("SELECT count(DISTINCT order_id) FROM order_events WHERE order_id LIKE $1").await;
    assert_eq!(distinct, count, "orders {pattern} with a status change");
}

async fn assert_order_jobs_recorded(database: &tokio_postgres::Client, prefix: &str, count: usize) {
    let pattern = format!("{prefix}-order-job-%");
    let recorded: i64 = database
        .query_one(
            "SELECT count(*) FROM processed_jobs WHERE job_id LIKE $1",
            &[&pattern],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        recorded,
        i64::try_from(count).unwrap(),
        "processed_jobs rows {pattern}"
    );
}

async fn assert_no_dead_letters(redis: &mut Redis) {
    let dead: Vec<String> = redis.lrange(format!("{QUEUE}:dead"), 0, -1).await.unwrap();
    assert!(dead.is_empty(), "dead letters: {dead:?}");
}

async fn start_worker(environment: &[(&'static str, String)]) -> WorkerProcess {
    let worker = WorkerProcess::start(environment);
    worker.wait_for_line(READY_LINE, STEP_TIMEOUT).await;
    worker
}

async fn stop_worker(mut worker: WorkerProcess) {
    worker.terminate();
    let status = worker.wait_for_exit(STEP_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "output:\n{}", worker.output_text());
}

async fn wait_for_processed(redis: &Redis, at_least: i64) {
    wait_until(
        &format!("{at_least} processed jobs"),
        DRAIN_TIMEOUT,
        || {
            let mut redis = redis.clone();
            async move {
                (counter(&mut redis, "yametee:stats:processed").await >= at_least).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn sigkill_mid_run_loses_no_job() {
    let Some(servers) = start_servers("sigkill_mid_run_loses_no_job").await else {
        return;
    };
    let mut redis = redis_connection(&servers).await;
    let database = connect_postgres(&servers.postgres.url()).await;
    let environment = worker_environment(&servers, &[("WORKER_CONCURRENCY", "4")]);
    let total = 30_000;
    let (jobs, orders) = mixed_jobs("kill", total);

    let mut worker = start_worker(&environment).await;
    insert_pending_orders(&database, "kill", orders).await;
    fill_queue(&mut redis, &jobs).await;
    wait_for_processed(&redis, 3_000).await;
    worker.kill_hard();

    let remaining: i64 = redis.llen(QUEUE).await.unwrap();
    let inflight = inflight_total(&mut redis).await;
    eprintln!("after SIGKILL: {remaining} queued, {inflight} in flight");
    assert!(
        remaining > 0,
        "the run finished before the kill; use more jobs"
    );

    // The same instance name returns its own in-flight jobs at start.
    let worker = start_worker(&environment).await;
    worker
        .wait_for_line(
            "that a previous run of this worker left in flight",
            STEP_TIMEOUT,
        )
        .await;
    wait_for_drain(&redis).await;

    let probes = probe_ids("kill", total);
    assert_eq!(
        existing_probe_results(&mut redis, &probes).await,
        probes.len()
    );
    assert_orders_processed_once(&database, "kill", orders).await;
    assert_order_jobs_recorded(&database, "kill", orders).await;
    assert_no_dead_letters(&mut redis).await;
    stop_worker(worker).await;
}

#[tokio::test]
async fn cut_connections_lose_no_job() {
    let Some(servers) = start_servers("cut_connections_lose_no_job").await else {
        return;
    };
    let mut redis = redis_connection(&servers).await;
    let database = connect_postgres(&servers.postgres.url()).await;
    let admin = connect_postgres(&servers.postgres.superuser_url()).await;
    let environment = worker_environment(&servers, &[("WORKER_CONCURRENCY", "4")]);
    let total = 40_000;
    let (jobs, orders) = mixed_jobs("cut", total);

    let worker = start_worker(&environment).await;
    insert_pending_orders(&database, "cut", orders).await;
    fill_queue(&mut redis, &jobs).await;

    // Three rounds of cutting every worker connection to Redis and to PostgreSQL, while
    // jobs are still queued.
    for round in 1..=3 {
        wait_for_processed(&redis, round * 2_000).await;
        let processed = counter(&mut redis, "yametee:stats:processed").await;
        assert!(
            processed < i64::try_from(total).unwrap(),
            "the run finished before cut {round}; use more jobs"
        );
        let killed: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
            .query_async(&mut redis)
            .await
            .unwrap();
        let terminated = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = 'yametee-worker'",
                &[],
            )
            .await
            .unwrap()
            .len();
        eprintln!("round {round}: cut {killed} Redis and {terminated} PostgreSQL connections");
    }
    wait_for_drain(&redis).await;
    let probes = probe_ids("cut", total);
    assert_eq!(
        existing_probe_results(&mut redis, &probes).await,
        probes.len()
    );
    assert_orders_processed_once(&database, "cut", orders).await;
    assert_order_jobs_recorded(&database, "cut", orders).await;
    assert_no_dead_letters(&mut redis).await;
    stop_worker(worker).await;
}

#[tokio::test]
async fn database_outage_delays_jobs_until_back() {
    let Some(servers) = start_servers("database_outage_delays_jobs_until_back").await else {
        return;
    };
    let mut redis = redis_connection(&servers).await;
    let worker = start_worker(&worker_environment(&servers, &[])).await;
    {
        let database = connect_postgres(&servers.postgres.url()).await;
        insert_pending_orders(&database, "outage", 5).await;
    }

    servers.postgres.stop();
    for index in 0..5 {
        let data = format!(r#"{{"orderId":"outage-order-{index}"}}"#);
        push(
            &mut redis,
            &job(&format!("outage-order-job-{index}"), "order:process", &data),
        )
        .await;
        push(
            &mut redis,
            &job(&format!("outage-probe-{index}"), "verify:probe", "{}"),
        )
        .await;
    }

    // Probes need only Redis and complete during the outage; orders wait for retries.
    let probes: Vec<String> = (0..5)
        .map(|index| format!("outage-probe-{index}"))
        .collect();
    wait_until("the probe results during the outage", STEP_TIMEOUT, || {
        let mut redis = redis.clone();
        let probes = probes.clone();
        async move { (existing_probe_results(&mut redis, &probes).await == 5).then_some(()) }
    })
    .await;
    wait_until("five orders in the retry set", STEP_TIMEOUT, || {
        let mut redis = redis.clone();
        async move {
            let retries: i64 = redis.zcard(format!("{QUEUE}:retry")).await.unwrap();
            (retries == 5).then_some(())
        }
    })
    .await;
    worker
        .wait_for_line(
            "Job outage-order-job-0 failed (attempt 1 of 5)",
            Duration::ZERO,
        )
        .await;

    tokio::time::sleep(Duration::from_secs(2)).await;
    servers.postgres.start_again();
    wait_for_drain(&redis).await;

    let database = connect_postgres(&servers.postgres.url()).await;
    assert_orders_processed_once(&database, "outage", 5).await;
    assert_order_jobs_recorded(&database, "outage", 5).await;
    assert_no_dead_letters(&mut redis).await;
    assert!(
        !worker.output_text().contains("gave up"),
        "{}",
        worker.output_text()
    );
    stop_worker(worker).await;
}

#[tokio::test]
async fn poison_jobs_go_to_dead_letters() {
    let Some(servers) = start_servers("poison_jobs_go_to_dead_letters").await else {
        return;
    };
    let mut redis = redis_connection(&servers).await;
    let relay = SmtpServer::start().await;
    let relay_url = relay.url();
    let worker = start_worker(&worker_environment(
        &servers,
        &[("SMTP_URL", &relay_url), ("SMTP_FROM", "shop@example.com")],
    ))
    .await;

    let email = |id: &str, to: &str, subject: &str| {
        job(
            id,
            "email:send",
            &format!(r#"{{"to":"{to}","subject":"{subject}","body":"b"}}"#),
        )
    };
    // Each poison job with a fragment of the reason its dead letter must give. The
    // jobs without an id are found by their raw text.
    let poison: Vec<(String, &str)> = vec![
        ("{not json".to_string(), "not valid JSON"),
        ("[1,2,3]".to_string(), "not a JSON object"),
        ("\"text\"".to_string(), "not a JSON object"),
        (r#"{"type":"verify:probe"}"#.to_string(), "no \"id\" field"),
        (
            r#"{"id":"","type":"verify:probe"}"#.to_string(),
            "job id is empty",
        ),
        (r#"{"id":"p-no-type"}"#.to_string(), "no \"type\" field"),
        (
            r#"{"id":"p-type-number","type":7}"#.to_string(),
            "job type is not a string",
        ),
        (job("p-unknown", "report:build", "{}"), "unknown job type"),
        (
            job("p-data-list", "verify:probe", "[1]"),
            "data is not a JSON object",
        ),
        (
            job("p-no-order", "order:process", "{}"),
            "data.orderId is missing",
        ),
        (
            job(
                "p-missing-order",
                "order:process",
                r#"{"orderId":"nowhere"}"#,
            ),
            "order nowhere does not exist",
        ),
        (
            email("p-bad-address", "nobody", "s"),
            "not a valid e-mail address",
        ),
        (
            email("p-header", "a@example.com", "x\\r\\nBcc: c@example.com"),
            "line break",
        ),
        (
            email("p-rejected", "reject@example.com", "s"),
            "rejected the message",
        ),
        (
            job("p-cache-key", "cache:warm", r#"{"keys":["users:all"]}"#),
            "unknown cache name",
        ),
        (
            job("p-event-id", "webhook:process", r#"{"eventId":"x"}"#),
            "data.eventId",
        ),
        (
            job("p-no-event", "webhook:process", r#"{"eventId":999999}"#),
            "webhook event 999999 does not exist",
        ),
        (
            job(
                "p-event-order",
                "webhook:process",
                r#"{"event":"payment.succeeded"}"#,
            ),
            "has no orderId",
        ),
    ];

    for (index, (raw, _)) in poison.iter().enumerate() {
        push(&mut redis, raw).await;
        push(
            &mut redis,
            &job(&format!("valid-{index}"), "verify:probe", "{}"),
        )
        .await;
    }
    push(
        &mut redis,
        &email("valid-email", "someone@example.com", "Hello"),
    )
    .await;

    for (raw, reason) in &poison {
        let raw = raw.clone();
        let envelope = wait_until(&format!("the dead letter of {raw}"), STEP_TIMEOUT, || {
            let mut redis = redis.clone();
            let raw = raw.clone();
            async move {
                let parsed = serde_json::from_str::<Value>(&raw).unwrap_or(Value::String(raw));
                dead_letter(&mut redis, |envelope| envelope["job"] == parsed).await
            }
        })
        .await;
        let stored_reason = envelope["reason"].as_str().unwrap_or_default();
        assert!(
            stored_reason.contains(reason),
            "reason of {raw:?} is {stored_reason:?}, expected it to contain {reason:?}"
        );
        assert!(envelope["failedAt"].as_str().is_some(), "{envelope}");
    }

    let valid: Vec<String> = (0..poison.len())
        .map(|index| format!("valid-{index}"))
        .collect();
    wait_until("every valid probe result", STEP_TIMEOUT, || {
        let mut redis = redis.clone();
        let valid = valid.clone();
        async move { (existing_probe_results(&mut redis, &valid).await == valid.len()).then_some(()) }
    })
    .await;
    wait_until("the valid e-mail delivered", STEP_TIMEOUT, || async {
        relay
            .messages()
            .iter()
            .any(|mail| mail.to == ["someone@example.com"])
            .then_some(())
    })
    .await;
    assert_eq!(relay.messages().len(), 1, "{:?}", relay.messages());

    // Each poison job failed once, without retries.
    let dead: i64 = redis.llen(format!("{QUEUE}:dead")).await.unwrap();
    assert_eq!(dead, i64::try_from(poison.len()).unwrap());
    let retries: i64 = redis.zcard(format!("{QUEUE}:retry")).await.unwrap();
    assert_eq!(retries, 0);
    wait_until("the failed counter", STEP_TIMEOUT, || {
        let mut redis = redis.clone();
        let expected = i64::try_from(poison.len()).unwrap();
        async move { (counter(&mut redis, "yametee:stats:failed").await == expected).then_some(()) }
    })
    .await;
    assert_eq!(
        counter(&mut redis, "yametee:stats:failed:order:process").await,
        2
    );
    assert_eq!(
        counter(&mut redis, "yametee:stats:failed:email:send").await,
        3
    );
    assert_eq!(
        counter(&mut redis, "yametee:stats:failed:webhook:process").await,
        3
    );
    stop_worker(worker).await;
}

#[tokio::test]
async fn email_without_relay_waits_for_retry() {
    let Some(servers) = start_servers("email_without_relay_waits_for_retry").await else {
        return;
    };
    let mut redis = redis_connection(&servers).await;
    let worker = start_worker(&worker_environment(&servers, &[])).await;
    worker
        .wait_for_line("SMTP_URL is not set", Duration::ZERO)
        .await;

    push(
        &mut redis,
        &job(
            "mail-1",
            "email:send",
            r#"{"to":"a@example.com","subject":"s","body":"b"}"#,
        ),
    )
    .await;
    let entry: String = wait_until("mail-1 in the retry set", STEP_TIMEOUT, || {
        let mut redis = redis.clone();
        async move {
            let entries: Vec<String> = redis.zrange(format!("{QUEUE}:retry"), 0, -1).await.unwrap();
            entries.into_iter().find(|entry| entry.contains("mail-1"))
        }
    })
    .await;
    let entry: Value = serde_json::from_str(&entry).unwrap();
    assert_eq!(entry["attempts"], 1);
    assert!(
        entry["lastError"].as_str().unwrap().contains("SMTP_URL"),
        "{entry}"
    );

    let database = connect_postgres(&servers.postgres.url()).await;
    let outbox = database
        .query_one(
            "SELECT status, attempts, last_error FROM email_outbox WHERE job_id = 'mail-1'",
            &[],
        )
        .await
        .expect("the outbox row of mail-1");
    assert_eq!(outbox.get::<_, String>(0), "queued");
    assert_eq!(outbox.get::<_, i32>(1), 1);
    assert!(outbox.get::<_, String>(2).contains("SMTP_URL"));
    assert_no_dead_letters(&mut redis).await;
    stop_worker(worker).await;
}

#[tokio::test]
async fn sigterm_mid_run_returns_unstarted_jobs() {
    let Some(servers) = start_servers("sigterm_mid_run_returns_unstarted_jobs").await else {
        return;
    };
    let mut redis = redis_connection(&servers).await;
    let database = connect_postgres(&servers.postgres.url()).await;
    let environment = worker_environment(&servers, &[("WORKER_CONCURRENCY", "4")]);
    let total = 20_000;
    let (jobs, orders) = mixed_jobs("term", total);

    let mut worker = start_worker(&environment).await;
    insert_pending_orders(&database, "term", orders).await;
    fill_queue(&mut redis, &jobs).await;
    wait_for_processed(&redis, 2_000).await;

    let signalled = Instant::now();
    worker.terminate();
    let status = worker.wait_for_exit(STEP_TIMEOUT).await;
    let output = worker.output_text();
    assert_eq!(status.code(), Some(0), "output:\n{output}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        signalled.elapsed()
    );
    assert_eq!(inflight_total(&mut redis).await, 0, "output:\n{output}");
    let remaining: i64 = redis.llen(QUEUE).await.unwrap();
    assert!(
        remaining > 0,
        "the run finished before SIGTERM; use more jobs"
    );

    let worker = start_worker(&environment).await;
    wait_for_drain(&redis).await;
    let probes = probe_ids("term", total);
    assert_eq!(
        existing_probe_results(&mut redis, &probes).await,
        probes.len()
    );
    assert_orders_processed_once(&database, "term", orders).await;
    assert_order_jobs_recorded(&database, "term", orders).await;
    assert_no_dead_letters(&mut redis).await;
    stop_worker(worker).await;
}

#[tokio::test]
async fn two_workers_share_one_queue() {
    let Some(servers) = start_servers("two_workers_share_one_queue").await else {
        return;
    };
    let mut redis = redis_connection(&servers).await;
    let database = connect_postgres(&servers.postgres.url()).await;
    let total = 20_000;
    let (jobs, orders) = mixed_jobs("pair", total);

    let first = start_worker(&worker_environment(
        &servers,
        &[("WORKER_NAME", "first"), ("WORKER_CONCURRENCY", "4")],
    ))
    .await;
    let second = start_worker(&worker_environment(
        &servers,
        &[("WORKER_NAME", "second"), ("WORKER_CONCURRENCY", "4")],
    ))
    .await;
    insert_pending_orders(&database, "pair", orders).await;
    fill_queue(&mut redis, &jobs).await;
    wait_for_drain(&redis).await;

    let probes = probe_ids("pair", total);
    assert_eq!(
        existing_probe_results(&mut redis, &probes).await,
        probes.len()
    );
    assert_orders_processed_once(&database, "pair", orders).await;
    assert_order_jobs_recorded(&database, "pair", orders).await;
    assert_no_dead_letters(&mut redis).await;

    // Both workers took part.
    let mut by_worker = std::collections::HashMap::<String, usize>::new();
    for id in probes.iter().step_by(50) {
        let result: String = redis.get(format!("yametee:probe:{id}")).await.unwrap();
        let result: Value = serde_json::from_str(&result).unwrap();
        let worker = result["worker"]
            .as_str()
            .unwrap()
            .split('@')
            .next()
            .unwrap()
            .to_string();
        *by_worker.entry(worker).or_default() += 1;
    }
    assert!(
        by_worker.get("first").is_some_and(|count| *count > 0),
        "{by_worker:?}"
    );
    assert!(
        by_worker.get("second").is_some_and(|count| *count > 0),
        "{by_worker:?}"
    );

    stop_worker(first).await;
    stop_worker(second).await;
}
