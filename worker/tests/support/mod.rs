//! Throwaway Redis and PostgreSQL servers on loopback, and a handle on the worker
//! binary, for the end-to-end tests.
//!
//! Each server lives in a temporary directory, listens on 127.0.0.1 on a free port, and
//! is stopped by its process id when its handle is dropped, also when a test fails.

#![allow(dead_code)]

pub mod smtp;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::Value;

/// Maximum wait for a server to accept connections.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two checks of a condition being waited for.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Queue list the worker uses by default, and the tests too.
pub const QUEUE: &str = "yametee:jobs";

pub const INSTALL_HINT: &str = "apt-get install redis-server postgresql";

/// Paths of the server programs the end-to-end tests need.
pub struct ServerPrograms {
    pub redis_server: PathBuf,
    /// Directory with `initdb` and `pg_ctl`.
    pub postgres_bin: PathBuf,
}

/// Finds redis-server and the newest PostgreSQL under /usr/lib/postgresql, or returns
/// which of them are missing.
pub fn find_server_programs() -> Result<ServerPrograms, String> {
    let redis_server = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file());

    let postgres_bin = fs::read_dir("/usr/lib/postgresql")
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin);

    match (redis_server, postgres_bin) {
        (Some(redis_server), Some(postgres_bin)) => Ok(ServerPrograms {
            redis_server,
            postgres_bin,
        }),
        (redis, postgres) => {
            let mut missing = Vec::new();
            if redis.is_none() {
                missing.push("redis-server");
            }
            if postgres.is_none() {
                missing.push("/usr/lib/postgresql/*/bin/initdb");
            }
            Err(missing.join(" and "))
        }
    }
}

/// Prints a SKIP banner that a CI log reader cannot miss. Under CI (`CI` set) the servers
/// must be there, so a missing one fails the test instead.
pub fn print_skip(test: &str, missing: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test} cannot run under CI: {missing} not found; install them with {INSTALL_HINT}");
    }
    eprintln!();
    eprintln!("################################################################");
    eprintln!("SKIP {test}: {missing} not found.");
    eprintln!("Install the servers to run it: {INSTALL_HINT}");
    eprintln!("################################################################");
    eprintln!();
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener =
        TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port on 127.0.0.1");
    listener
        .local_addr()
        .expect("reading the bound port")
        .port()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn chown_to_postgres(path: &Path) {
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(path)
        .status()
        .expect("running chown");
    assert!(status.success(), "chown postgres {} failed", path.display());
}

/// Builds a command that runs as the `postgres` user when the tests run as root, because
/// PostgreSQL refuses to run as root.
fn postgres_command(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run_checked(mut command: Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    assert!(
        output.status.success(),
        "{what} failed with {}:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + SERVER_START_TIMEOUT;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    panic!("{what} did not accept connections on 127.0.0.1:{port} within {SERVER_START_TIMEOUT:?}");
}

/// A redis-server child process without persistence.
pub struct RedisServer {
    child: Child,
    program: PathBuf,
    dir: PathBuf,
    pub port: u16,
    pub password: String,
}

impl RedisServer {
    pub fn start(program: &Path, dir: &Path) -> RedisServer {
        RedisServer::start_on_port(program, dir, free_port())
    }

    pub fn start_on_port(program: &Path, dir: &Path, port: u16) -> RedisServer {
        let password = "redis-test-secret".to_string();
        let child = spawn_redis(program, dir, port, &password);
        let server = RedisServer {
            child,
            program: program.to_path_buf(),
            dir: dir.to_path_buf(),
            port,
            password,
        };
        wait_for_port(port, "redis-server");
        server
    }

    /// Kills the server and starts a new one on the same port, empty because nothing
    /// is persisted. The new server is up when this returns.
    pub fn restart(&mut self, down_for: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down_for);
        self.child = spawn_redis(&self.program, &self.dir, self.port, &self.password);
        wait_for_port(self.port, "restarted redis-server");
    }

    /// Returns the URL in the format the deploy tool writes: `redis://:PASSWORD@HOST:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://:{}@127.0.0.1:{}/0", self.password, self.port)
    }
}

fn spawn_redis(program: &Path, dir: &Path, port: u16, password: &str) -> Child {
    Command::new(program)
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--requirepass", password])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting redis-server")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL cluster made with initdb and run by pg_ctl, with a `yame_tee` database
/// owned by `yametee_user`.
pub struct PostgresServer {
    bin: PathBuf,
    data_dir: PathBuf,
    server_options: String,
    pub port: u16,
    pub superuser_password: String,
}

pub const DATABASE_USER: &str = "yametee_user";
pub const DATABASE_PASSWORD: &str = "pg-test-secret";
pub const DATABASE_NAME: &str = "yame_tee";

impl PostgresServer {
    pub fn start(bin: &Path, dir: &Path) -> PostgresServer {
        // The postgres user must be able to reach the directories below the temporary
        // directory, which tempfile creates with mode 0700.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        let data_dir = dir.join("pgdata");
        let socket_dir = dir.join("pgsocket");
        let secrets_dir = dir.join("pgsecrets");
        for path in [&data_dir, &socket_dir, &secrets_dir] {
            fs::create_dir(path).expect("creating a PostgreSQL directory");
            fs::set_permissions(path, fs::Permissions::from_mode(0o700)).expect("chmod");
            if is_root() {
                chown_to_postgres(path);
            }
        }

        let superuser_password = "pg-superuser-secret".to_string();
        let password_file = secrets_dir.join("superuser-password");
        fs::write(&password_file, &superuser_password).expect("writing the password file");
        if is_root() {
            chown_to_postgres(&password_file);
        }

        let mut initdb = postgres_command(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", password_file.display()))
            .args(["--encoding=UTF8", "--no-sync"]);
        run_checked(initdb, "initdb");

        let port = free_port();
        let server_options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=40 -c shared_buffers=16MB",
            socket_dir.display()
        );
        let server = PostgresServer {
            bin: bin.to_path_buf(),
            data_dir,
            server_options,
            port,
            superuser_password,
        };
        server.start_again();
        server
    }

    /// Starts the cluster's server, after [`PostgresServer::stop`] or for the first time.
    pub fn start_again(&self) {
        let mut pg_ctl = postgres_command(&self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(self.data_dir.join("server.log"))
            .args(["-o", &self.server_options, "-w", "-t", "30", "start"]);
        run_checked(pg_ctl, "pg_ctl start");
        wait_for_port(self.port, "PostgreSQL");
    }

    /// Stops the server, closing every connection, and keeps the data for
    /// [`PostgresServer::start_again`].
    pub fn stop(&self) {
        let mut pg_ctl = postgres_command(&self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "-t", "30", "stop"]);
        run_checked(pg_ctl, "pg_ctl stop");
    }

    /// Returns the URL of the worker's database as the deploy tool writes it.
    pub fn url(&self) -> String {
        self.url_with_password(DATABASE_PASSWORD)
    }

    pub fn url_with_password(&self, password: &str) -> String {
        format!(
            "postgres://{DATABASE_USER}:{password}@127.0.0.1:{}/{DATABASE_NAME}",
            self.port
        )
    }

    pub fn superuser_url(&self) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/postgres",
            self.superuser_password, self.port
        )
    }

    /// Creates the worker's role and its database, as the deploy tool's apply does.
    pub async fn create_worker_database(&self) {
        let admin = connect_postgres(&self.superuser_url()).await;
        // Two calls, because CREATE DATABASE cannot share a multi-statement transaction.
        admin
            .batch_execute(&format!(
                "CREATE ROLE {DATABASE_USER} LOGIN PASSWORD '{DATABASE_PASSWORD}'"
            ))
            .await
            .expect("creating the worker's role");
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {DATABASE_NAME} OWNER {DATABASE_USER}"
            ))
            .await
            .expect("creating the worker's database");
    }

    fn postmaster_pid(&self) -> Option<i32> {
        let contents = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        contents.lines().next()?.trim().parse().ok()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let pid = self.postmaster_pid();
        let mut pg_ctl = postgres_command(&self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-t", "10", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let stopped = pg_ctl.status().is_ok_and(|status| status.success());

        if !stopped {
            if let Some(pid) = pid {
                // SAFETY: kill has no memory-safety preconditions; the pid is the
                // postmaster this handle started.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Opens a PostgreSQL connection for the test's own queries.
pub async fn connect_postgres(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|error| panic!("connecting to PostgreSQL for the test: {error}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A running worker binary whose stdout and stderr lines are collected.
pub struct WorkerProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl WorkerProcess {
    /// Starts the worker with exactly the given environment variables, plus PATH.
    pub fn start(environment: &[(&str, String)]) -> WorkerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_yametee-worker"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in environment {
            command.env(name, value);
        }

        let mut child = command.spawn().expect("starting the worker binary");
        let lines = Arc::new(Mutex::new(Vec::new()));
        collect_lines(
            child.stdout.take().expect("piped stdout"),
            Arc::clone(&lines),
        );
        collect_lines(
            child.stderr.take().expect("piped stderr"),
            Arc::clone(&lines),
        );
        WorkerProcess { child, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns every output line so far.
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn output_text(&self) -> String {
        self.output().join("\n")
    }

    /// Waits until an output line contains `text`, and panics with the output so far when
    /// none does within `timeout`.
    pub async fn wait_for_line(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().iter().any(|line| line.contains(text)) {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        panic!(
            "no worker output line contains {text:?} within {timeout:?}; output:\n{}",
            self.output_text()
        );
    }

    /// Sends SIGKILL, as a crash or the OOM killer would.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM, as systemd does on stop.
    pub fn terminate(&self) {
        let pid = i32::try_from(self.child.id()).expect("pid fits in i32");
        // SAFETY: kill has no memory-safety preconditions; the pid is this handle's child,
        // not yet reaped, so it cannot have been reused.
        let result = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(result, 0, "sending SIGTERM to the worker failed");
    }

    /// Waits for the worker to exit, and panics with its output when it has not exited
    /// within `timeout`.
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("checking the worker's status") {
                // Let the reader threads take the last lines.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return status;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        panic!(
            "worker did not exit within {timeout:?}; output:\n{}",
            self.output_text()
        );
    }

    /// Returns the resident set size in KiB, from /proc.
    pub fn resident_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("reading the worker's /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line in /proc status")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect_lines(stream: impl Read + Send + 'static, lines: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            // Echoed so that `cargo test -- --nocapture` shows the worker's log.
            eprintln!("[worker] {line}");
            lines.lock().unwrap().push(line);
        }
    });
}

/// A socket in the role of systemd's notification socket (`NOTIFY_SOCKET`).
pub struct NotifySocket {
    socket: UnixDatagram,
    pub path: PathBuf,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("binding the notification socket");
        NotifySocket { socket, path }
    }

    /// Returns the next notification's text, or `None` when none arrives within `timeout`.
    pub fn receive(&self, timeout: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(timeout))
            .expect("setting the read timeout");
        let mut buffer = [0u8; 4096];
        let length = self.socket.recv(&mut buffer).ok()?;
        Some(String::from_utf8_lossy(&buffer[..length]).into_owned())
    }
}

/// Polls `check` until it returns `Some`, and panics with `what` after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

pub struct Servers {
    pub redis: RedisServer,
    pub postgres: PostgresServer,
    // Dropped last, after both servers have stopped.
    pub dir: tempfile::TempDir,
}

/// Starts both servers, or prints the SKIP banner and returns `None` when they are not
/// installed.
pub async fn start_servers(test: &str) -> Option<Servers> {
    let programs = match find_server_programs() {
        Ok(programs) => programs,
        Err(missing) => {
            print_skip(test, &missing);
            return None;
        }
    };

    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let redis = RedisServer::start(&programs.redis_server, dir.path());
    let postgres = PostgresServer::start(&programs.postgres_bin, dir.path());
    postgres.create_worker_database().await;
    Some(Servers {
        redis,
        postgres,
        dir,
    })
}

pub fn worker_environment(
    servers: &Servers,
    overrides: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let mut environment = vec![
        ("DATABASE_URL", servers.postgres.url()),
        ("REDIS_URL", servers.redis.url()),
    ];
    for (name, value) in overrides {
        environment.retain(|(existing, _)| existing != name);
        environment.push((name, value.to_string()));
    }
    environment
}

pub async fn redis_connection(servers: &Servers) -> redis::aio::MultiplexedConnection {
    redis::Client::open(servers.redis.url())
        .expect("parsing the Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connecting to Redis for the test")
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("reading the host name")
        .trim()
        .to_string()
}

pub fn job(id: &str, job_type: &str, data: &str) -> String {
    format!(
        r#"{{"id":"{id}","type":"{job_type}","data":{data},"createdAt":"2025-01-01T00:00:00.000Z"}}"#
    )
}

pub async fn push(redis: &mut redis::aio::MultiplexedConnection, raw: &str) {
    let _: i64 = redis.rpush(QUEUE, raw).await.expect("RPUSH a job");
}

/// Returns the first dead letter envelope for which `matches` is true.
pub async fn dead_letter(
    redis: &mut redis::aio::MultiplexedConnection,
    matches: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let entries: Vec<String> = redis.lrange(format!("{QUEUE}:dead"), 0, -1).await.ok()?;
    entries
        .iter()
        .filter_map(|entry| serde_json::from_str::<Value>(entry).ok())
        .find(|envelope| matches(envelope))
}
