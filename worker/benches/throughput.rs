//! Measures one worker process against a Redis server on 127.0.0.1 that it starts itself.
//! For each concurrency it prints the probe jobs per second draining a pre-filled queue,
//! the pick-up latency of jobs pushed one at a time into an idle worker, and the resident
//! memory when idle and at peak.
//!
//! Run with `cargo bench -p yametee-worker --bench throughput`. It needs redis-server and
//! PostgreSQL (the worker connects to PostgreSQL at start, though probe jobs never use
//! it), and takes about a minute. Environment variables change the run:
//! `BENCH_CONCURRENCY` lists the concurrencies (default `1,4`: the worker's default and
//! the one the deploy tool's inventory sets), `BENCH_JOBS` the jobs per drain run
//! (default 200000) and `BENCH_PICKUPS` the single pushes (default 2000).

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use support::{find_server_programs, PostgresServer, RedisServer};
use yametee_worker::config::DEFAULT_CONCURRENCY;

const QUEUE: &str = "yametee:jobs";
/// Maximum wait for a worker to start, and for one drain run to finish.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Maximum wait for the result of one job pushed into an idle worker.
const PICKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Wait after a single push before reading its result, long enough that the worker has
/// finished the job and is blocked in `BLMOVE` again.
const PICKUP_POLL_INTERVAL: Duration = Duration::from_millis(3);
/// Jobs pushed per pipelined round trip when filling the queue.
const FILL_CHUNK: usize = 5_000;

fn main() {
    let programs = match find_server_programs() {
        Ok(programs) => programs,
        Err(missing) => {
            eprintln!(
                "cannot run the benchmark: {missing} not found ({})",
                support::INSTALL_HINT
            );
            std::process::exit(2);
        }
    };
    let jobs = env_count("BENCH_JOBS", 200_000);
    let pickups = env_count("BENCH_PICKUPS", 2_000);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the benchmark's runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let redis_server = RedisServer::start(&programs.redis_server, dir.path());
        let postgres = PostgresServer::start(&programs.postgres_bin, dir.path());
        postgres.create_worker_database().await;
        let mut redis = redis::Client::open(redis_server.url())
            .expect("parsing the Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connecting to Redis");

        println!("yametee-worker benchmark: {}", machine_summary());
        println!("{jobs} probe jobs per drain run, {pickups} single pushes for pick-up latency");
        println!();

        let concurrencies = concurrencies_to_run();
        for concurrency in concurrencies {
            let log = dir.path().join(format!("worker-{concurrency}.log"));
            let mut worker = Worker::start(&redis_server, &postgres, concurrency, &log).await;
            let idle_kib = worker.memory_kib("VmRSS");

            let rate = drain_run(&mut redis, jobs).await;
            let latencies = pickup_run(&mut redis, pickups).await;
            let peak_kib = worker.memory_kib("VmHWM");
            worker.stop();

            let default_mark = if concurrency == DEFAULT_CONCURRENCY {
                " (default)"
            } else {
                ""
            };
            println!("concurrency {concurrency}{default_mark}:");
            println!("  drain:   {rate:.0} jobs/s");
            println!(
                "  pick-up: p50 {} µs, p99 {} µs, max {} µs",
                percentile(&latencies, 50.0),
                percentile(&latencies, 99.0),
                latencies.last().copied().unwrap_or_default()
            );
            println!(
                "  memory:  {:.1} MiB resident when idle, {:.1} MiB peak",
                idle_kib as f64 / 1024.0,
                peak_kib as f64 / 1024.0
            );

            let _: () = redis::cmd("FLUSHDB")
                .query_async(&mut redis)
                .await
                .expect("FLUSHDB between runs");
        }
    });
}

/// Returns the comma-separated list in `BENCH_CONCURRENCY`, or the worker's default
/// concurrency and 4.
fn concurrencies_to_run() -> Vec<usize> {
    if let Ok(list) = std::env::var("BENCH_CONCURRENCY") {
        return list
            .split(',')
            .map(|value| {
                value.trim().parse().unwrap_or_else(|_| {
                    panic!("BENCH_CONCURRENCY must list whole numbers, got {list:?}")
                })
            })
            .collect();
    }
    let mut concurrencies = vec![DEFAULT_CONCURRENCY];
    if DEFAULT_CONCURRENCY != 4 {
        concurrencies.push(4);
    }
    concurrencies
}

fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, got {value:?}")),
        Err(_) => default,
    }
}

fn machine_summary() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|name| name.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism().map_or(0, |cores| cores.get());
    format!("{cores} cores, {cpu}")
}

/// A worker process whose log goes to a file, so that the benchmark does not spend its
/// own time reading 200,000 log lines.
struct Worker {
    child: Child,
}

impl Worker {
    async fn start(
        redis: &RedisServer,
        postgres: &PostgresServer,
        concurrency: usize,
        log: &std::path::Path,
    ) -> Worker {
        let log_file = File::create(log).expect("creating the worker log");
        let child = Command::new(env!("CARGO_BIN_EXE_yametee-worker"))
            .env_clear()
            .env("DATABASE_URL", postgres.url())
            .env("REDIS_URL", redis.url())
            .env("WORKER_CONCURRENCY", concurrency.to_string())
            .env("WORKER_NAME", format!("bench-{concurrency}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("starting the worker binary");
        let worker = Worker { child };

        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("ready and waiting for jobs") {
                break;
            }
            assert!(
                started.elapsed() < RUN_TIMEOUT,
                "the worker did not become ready within {RUN_TIMEOUT:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let start-up allocations settle before the idle reading.
        tokio::time::sleep(Duration::from_millis(500)).await;
        worker
    }

    /// Reads one of the kB lines of /proc/<pid>/status, such as VmRSS or VmHWM.
    fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("reading the worker's /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} line in the worker's /proc status"))
    }

    fn stop(&mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid fits in i32");
        // SAFETY: kill has no memory-safety preconditions; the pid is this handle's child,
        // not yet reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + RUN_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn probe_job(id: &str) -> String {
    format!(
        r#"{{"id":"{id}","type":"verify:probe","data":{{}},"createdAt":"2025-01-01T00:00:00.000Z"}}"#
    )
}

/// Fills a side list and renames it onto the queue, so that every job is queued at once.
/// Returns the jobs per second from the rename until the last completion was counted.
async fn drain_run(redis: &mut redis::aio::MultiplexedConnection, jobs: usize) -> f64 {
    let staging = format!("{QUEUE}:bench-staging");
    let mut pushed = 0;
    while pushed < jobs {
        let count = FILL_CHUNK.min(jobs - pushed);
        let chunk: Vec<String> = (pushed..pushed + count)
            .map(|index| probe_job(&format!("drain-{index}")))
            .collect();
        let _: i64 = redis
            .rpush(&staging, chunk)
            .await
            .expect("filling the side list");
        pushed += count;
    }
    let before: i64 = processed_count(redis).await;

    let started = Instant::now();
    let _: () = redis
        .rename(&staging, QUEUE)
        .await
        .expect("renaming onto the queue");
    loop {
        let done = processed_count(redis).await - before;
        if done >= jobs as i64 {
            break;
        }
        assert!(
            started.elapsed() < RUN_TIMEOUT,
            "only {done} of {jobs} jobs done within {RUN_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    jobs as f64 / started.elapsed().as_secs_f64()
}

async fn processed_count(redis: &mut redis::aio::MultiplexedConnection) -> i64 {
    let count: Option<i64> = redis
        .get("yametee:stats:processed")
        .await
        .expect("reading the processed counter");
    count.unwrap_or(0)
}

/// Pushes jobs one at a time into an idle worker and returns, sorted, the microseconds
/// from just before each push to the `pickedUpUs` time in its probe result.
async fn pickup_run(redis: &mut redis::aio::MultiplexedConnection, pickups: usize) -> Vec<i64> {
    let mut latencies = Vec::with_capacity(pickups);
    for index in 0..pickups {
        let id = format!("pickup-{index}");
        let key = format!("yametee:probe:{id}");
        let pushed_us = yametee_worker::unix_micros();
        let _: i64 = redis
            .rpush(QUEUE, probe_job(&id))
            .await
            .expect("pushing a job");

        // The latency comes from the worker's own timestamp, so the benchmark sleeps
        // instead of polling, which would take CPU time from the worker and Redis.
        let started = Instant::now();
        let result = loop {
            tokio::time::sleep(PICKUP_POLL_INTERVAL).await;
            let result: Option<String> = redis.get(&key).await.expect("reading a probe result");
            if let Some(result) = result {
                break result;
            }
            assert!(
                started.elapsed() < PICKUP_TIMEOUT,
                "job {id} was not picked up within {PICKUP_TIMEOUT:?}"
            );
        };
        let result: serde_json::Value =
            serde_json::from_str(&result).expect("probe result is JSON");
        let picked_up_us = result["pickedUpUs"]
            .as_i64()
            .expect("pickedUpUs is a number");
        latencies.push(picked_up_us - pushed_us);
    }
    latencies.sort_unstable();
    latencies
}

/// Returns the value below which `percent` of the sorted `values` fall.
fn percentile(values: &[i64], percent: f64) -> i64 {
    if values.is_empty() {
        return 0;
    }
    let rank = (percent / 100.0 * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}
