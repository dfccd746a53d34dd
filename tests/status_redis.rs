//! `status`'s reading of Redis against a redis-server started on 127.0.0.1 with a password,
//! filled with keys the way the worker writes them. No other network.
//!
//! Without redis-server installed (`apt-get install redis-server`) the tests print a SKIP
//! line and pass, except under CI (`CI` set), where they fail.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use yametee_deploy::status::{self, QueueSnapshot, RedisAddress};

const QUEUE: &str = "yametee:jobs";
const PASSWORD: &str = "status-test-secret";
/// Maximum wait for redis-server to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A redis-server child process, killed by its pid when dropped.
struct RedisServer {
    child: Child,
    port: u16,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts redis-server on a free loopback port and a Unix socket, or returns `None`
    /// when it is not installed.
    fn start(test: &str) -> Option<RedisServer> {
        let Some(program) = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.exists())
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test} cannot run under CI: redis-server is not installed"
            );
            eprintln!("SKIP {test}: redis-server is not installed");
            return None;
        };
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let socket = dir.path().join("redis.sock");
        let child = Command::new(program)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--requirepass", PASSWORD])
            .arg("--unixsocket")
            .arg(&socket)
            .args(["--unixsocketperm", "700"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        let server = RedisServer {
            child,
            port,
            socket,
            _dir: dir,
        };
        server.wait_until_ready();
        Some(server)
    }

    fn wait_until_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            let listening = std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if listening && self.socket.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server did not listen on 127.0.0.1:{} within {START_TIMEOUT:?}",
            self.port
        );
    }

    fn tcp(&self) -> RedisAddress {
        RedisAddress::Tcp {
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    listener.local_addr().expect("local address").port()
}

async fn connection(address: &RedisAddress) -> MultiplexedConnection {
    status::connect(address, PASSWORD)
        .await
        .expect("connecting to the test redis-server")
}

async fn command(connection: &mut MultiplexedConnection, args: &[&str]) {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    let _: redis::Value = command
        .query_async(connection)
        .await
        .unwrap_or_else(|error| panic!("{args:?}: {error}"));
}

async fn server_time_ms(connection: &mut MultiplexedConnection) -> i64 {
    let (seconds, micros): (i64, i64) = redis::cmd("TIME").query_async(connection).await.unwrap();
    seconds * 1000 + micros / 1000
}

fn iso(ms: i64) -> String {
    yametee_deploy::queue::rfc3339(Duration::from_millis(ms as u64))
}

/// Fills Redis as a running deployment would leave it: one live worker with a job in
/// flight, one dead worker that still has two in flight, and jobs waiting, retrying and
/// dead.
async fn fill(connection: &mut MultiplexedConnection) -> i64 {
    let now = server_time_ms(connection).await;
    let minute = now.div_euclid(60_000);
    let oldest = format!(
        r#"{{"id":"order-1","type":"order:process","data":{{"orderId":"o-1"}},"createdAt":"{}"}}"#,
        iso(now - 90_000)
    );
    let newer = format!(
        r#"{{"id":"probe-2","type":"verify:probe","data":{{}},"createdAt":"{}"}}"#,
        iso(now - 1_000)
    );
    command(connection, &["RPUSH", QUEUE, &oldest, &newer]).await;

    let live = "yametee:workers:yametee-worker@worker";
    let heartbeat =
        r#"{"pid":4242,"startedAt":"2025-01-01T11:00:00.000Z","concurrency":4,"version":"0.1.0"}"#;
    command(connection, &["SET", live, heartbeat, "EX", "15"]).await;
    let live_inflight = format!("{QUEUE}:inflight:yametee-worker@worker");
    command(connection, &["RPUSH", &live_inflight, "{}"]).await;
    let dead_inflight = format!("{QUEUE}:inflight:yametee-worker@old-host");
    command(connection, &["RPUSH", &dead_inflight, "{}", "{}"]).await;

    let retry = format!("{QUEUE}:retry");
    command(connection, &["ZADD", &retry, "1", "a", "2", "b", "3", "c"]).await;
    let dead = format!("{QUEUE}:dead");
    command(connection, &["RPUSH", &dead, "{}"]).await;

    command(connection, &["SET", "yametee:stats:processed", "1000"]).await;
    command(connection, &["SET", "yametee:stats:failed", "9"]).await;
    let minute_key = |kind: &str, minute: i64| format!("yametee:stats:minute:{kind}:{minute}");
    command(
        connection,
        &["SET", &minute_key("processed", minute - 1), "60"],
    )
    .await;
    command(connection, &["SET", &minute_key("processed", minute), "30"]).await;
    command(connection, &["SET", &minute_key("failed", minute), "3"]).await;
    // Older minutes are outside the rate window.
    command(
        connection,
        &["SET", &minute_key("processed", minute - 2), "5000"],
    )
    .await;
    now
}

fn assert_filled_snapshot(snapshot: &QueueSnapshot, filled_at: i64) {
    assert_eq!(snapshot.queue, QUEUE);
    assert!(snapshot.time_unix_ms >= filled_at, "{snapshot:?}");
    assert_eq!(snapshot.jobs.waiting, 2);
    assert_eq!(snapshot.jobs.in_flight, 3);
    assert_eq!(snapshot.jobs.retry, 3);
    assert_eq!(snapshot.jobs.dead, 1);

    let oldest = snapshot
        .jobs
        .oldest_waiting
        .as_ref()
        .expect("a waiting job");
    assert_eq!(oldest.id.as_deref(), Some("order-1"));
    let age = oldest.age_ms.expect("an age");
    assert!((90_000..100_000).contains(&age), "age {age} ms");

    assert_eq!(snapshot.processed.total, 1000);
    assert_eq!(snapshot.failed.total, 9);
    let window = snapshot.rate_window_secs;
    assert!((60.0..=120.0).contains(&window), "window {window} s");
    let expected = 90.0 * 60.0 / window;
    assert!(
        (snapshot.processed.per_minute - expected).abs() < 0.01,
        "processed {}/min, expected {expected} over {window} s",
        snapshot.processed.per_minute
    );
    assert!(
        (snapshot.failed.per_minute - 3.0 * 60.0 / window).abs() < 0.01,
        "failed {}/min",
        snapshot.failed.per_minute
    );
}

#[tokio::test]
async fn snapshot_reads_queue_as_worker_writes_it() {
    let Some(server) = RedisServer::start("snapshot_reads_queue_as_worker_writes_it") else {
        return;
    };
    let mut redis = connection(&server.tcp()).await;
    let filled_at = fill(&mut redis).await;

    let snapshot = status::read_snapshot(&mut redis, QUEUE, &[]).await.unwrap();

    assert_filled_snapshot(&snapshot, filled_at);
    let names: Vec<&str> = snapshot
        .workers
        .iter()
        .map(|worker| worker.instance.as_str())
        .collect();
    assert_eq!(
        names,
        vec!["yametee-worker@old-host", "yametee-worker@worker"]
    );
    let dead = &snapshot.workers[0];
    assert!(!dead.alive);
    assert_eq!(dead.in_flight, 2);
    assert_eq!(dead.heartbeat_ttl_ms, None);
    let live = &snapshot.workers[1];
    assert!(live.alive);
    assert_eq!(live.in_flight, 1);
    assert_eq!(live.pid, Some(4242));
    assert_eq!(live.concurrency, Some(4));
    let ttl = live.heartbeat_ttl_ms.expect("a heartbeat TTL");
    assert!((1..=15_000).contains(&ttl), "TTL {ttl} ms");
}

#[tokio::test]
async fn expected_instance_without_heartbeat_is_dead() {
    let Some(server) = RedisServer::start("expected_instance_without_heartbeat_is_dead") else {
        return;
    };
    let mut redis = connection(&server.tcp()).await;

    let expected = vec!["yametee-worker@worker-2".to_string()];
    let snapshot = status::read_snapshot(&mut redis, QUEUE, &expected)
        .await
        .unwrap();

    assert_eq!(snapshot.workers.len(), 1);
    assert_eq!(snapshot.workers[0].instance, "yametee-worker@worker-2");
    assert!(!snapshot.workers[0].alive);
    assert_eq!(snapshot.jobs.waiting, 0);
    assert_eq!(snapshot.jobs.oldest_waiting, None);
    assert_eq!(snapshot.processed.total, 0);
    assert_eq!(snapshot.processed.per_minute, 0.0);
}

#[tokio::test]
async fn expired_heartbeat_turns_worker_dead() {
    let Some(server) = RedisServer::start("expired_heartbeat_turns_worker_dead") else {
        return;
    };
    let mut redis = connection(&server.tcp()).await;
    let key = "yametee:workers:yametee-worker@worker";
    command(&mut redis, &["SET", key, "{}", "PX", "200"]).await;
    let expected = vec!["yametee-worker@worker".to_string()];

    let before = status::read_snapshot(&mut redis, QUEUE, &expected)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = status::read_snapshot(&mut redis, QUEUE, &expected)
        .await
        .unwrap();

    assert!(before.workers[0].alive);
    assert!(!after.workers[0].alive);
    assert_eq!(after.workers.len(), 1);
}

#[tokio::test]
async fn unix_socket_reads_same_snapshot() {
    let Some(server) = RedisServer::start("unix_socket_reads_same_snapshot") else {
        return;
    };
    let filled_at = fill(&mut connection(&server.tcp()).await).await;

    // The SSH port forward hands status a Unix socket like this one.
    let mut redis = connection(&RedisAddress::Unix(server.socket.clone())).await;
    let snapshot = status::read_snapshot(&mut redis, QUEUE, &[]).await.unwrap();

    assert_filled_snapshot(&snapshot, filled_at);
}

#[tokio::test]
async fn wrong_password_is_connect_error() {
    let Some(server) = RedisServer::start("wrong_password_is_connect_error") else {
        return;
    };

    let error = status::connect(&server.tcp(), "not-the-password")
        .await
        .expect_err("authentication must fail");

    let text = yametee_deploy::deploy::error_chain(&error);
    assert!(
        text.starts_with(&format!(
            "cannot connect to Redis at 127.0.0.1:{}",
            server.port
        )),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
}

#[tokio::test]
async fn closed_socket_is_connect_error() {
    let missing = Path::new("/nonexistent-yametee-status/redis.sock");

    let error = status::connect(&RedisAddress::Unix(missing.to_path_buf()), PASSWORD)
        .await
        .expect_err("nothing listens there");

    assert!(
        error
            .to_string()
            .contains("cannot connect to Redis at /nonexistent-yametee-status/redis.sock"),
        "{error}"
    );
}
