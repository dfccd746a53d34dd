//! The SSH side of `status`: one connection per worker host, the journal read on each, and
//! Redis reached through a port forward on a worker host's connection, so that Redis is
//! never opened to the machine running `status`.

use std::time::Duration;

use futures::future::join_all;
use redis::aio::MultiplexedConnection;

use super::report::{StatusReport, WorkerHost};
use super::snapshot::{self, RedisAddress};
use crate::deploy::error_chain;
use crate::inventory::{Host, Inventory};
use crate::render::worker_paths;
use crate::secrets::Secrets;
use crate::ssh::{Destination, Remote, RemoteCommand, SshError, SshOverrides};

/// Limit for the journal and host name commands; a refresh should not wait longer.
const REMOTE_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit for reading the whole queue state, connection included.
const REDIS_READ_TIMEOUT: Duration = Duration::from_secs(15);

/// A worker host and its connection, kept open between refreshes.
struct Connection {
    host: Host,
    remote: Option<Remote>,
    /// `<worker name>@<kernel host name>`, read once per connection.
    instance: Option<String>,
    last_error: Option<String>,
}

/// The local end of the port forward to Redis and the connection through it.
struct RedisLink {
    /// Private directory holding the socket; removed when dropped.
    _dir: tempfile::TempDir,
    connection: MultiplexedConnection,
}

/// Reads the status of every selected worker host and of the queue, refresh after refresh.
pub struct Monitor<'a> {
    inventory: &'a Inventory,
    secrets: &'a Secrets,
    ssh: &'a SshOverrides,
    journal_lines: usize,
    connections: Vec<Connection>,
    redis: Option<RedisLink>,
}

impl<'a> Monitor<'a> {
    /// Prepares a monitor of `hosts`, the worker hosts selected; nothing is connected yet.
    pub fn new(
        inventory: &'a Inventory,
        secrets: &'a Secrets,
        ssh: &'a SshOverrides,
        hosts: Vec<Host>,
        journal_lines: usize,
    ) -> Monitor<'a> {
        let connections = hosts
            .into_iter()
            .map(|host| Connection {
                host,
                remote: None,
                instance: None,
                last_error: None,
            })
            .collect();
        Monitor {
            inventory,
            secrets,
            ssh,
            journal_lines,
            connections,
            redis: None,
        }
    }

    /// Connects to the hosts that are not connected, reads the queue and the journals, and
    /// returns the report. A failure is reported and retried at the next refresh.
    pub async fn refresh(&mut self) -> StatusReport {
        self.connect_missing().await;
        let linked = self.open_redis_link().await;

        let queue = &self.inventory.app.queue;
        let expected: Vec<String> = self
            .connections
            .iter()
            .filter_map(|connection| connection.instance.clone())
            .collect();
        let journal_lines = self.journal_lines;
        let journals = join_all(
            self.connections
                .iter()
                .map(|connection| read_journal(connection, journal_lines)),
        );
        let redis = self.redis.as_mut();
        let snapshot = async {
            linked?;
            let link = redis.ok_or("no Redis connection")?;
            let read = snapshot::read_snapshot(&mut link.connection, queue, &expected);
            match tokio::time::timeout(REDIS_READ_TIMEOUT, read).await {
                Ok(result) => result.map_err(|error| error_chain(&error)),
                Err(_) => Err(error_chain(&snapshot::SnapshotError::Timeout(
                    REDIS_READ_TIMEOUT,
                ))),
            }
        };
        let (snapshot, journals): (Result<_, String>, _) = tokio::join!(snapshot, journals);

        if snapshot.is_err() {
            // The next refresh opens a new forward, perhaps through another host.
            self.redis = None;
        }
        let snapshot = snapshot.map_err(|error| self.secrets.redact(&error));
        let mut hosts = Vec::new();
        let mut broken = Vec::new();
        for (connection, journal) in self.connections.iter_mut().zip(journals) {
            let (host, remote) = connection.report(journal, self.secrets);
            hosts.push(host);
            broken.extend(remote);
        }
        join_all(broken.into_iter().map(Remote::close)).await;
        StatusReport::new(snapshot, hosts)
    }

    /// Closes every SSH connection.
    pub async fn close(self) {
        drop(self.redis);
        let remotes = self
            .connections
            .into_iter()
            .filter_map(|connection| connection.remote);
        join_all(remotes.map(Remote::close)).await;
    }

    async fn connect_missing(&mut self) {
        let name = &self.inventory.app.worker.name;
        let ssh = self.ssh;
        let missing = self
            .connections
            .iter_mut()
            .filter(|connection| connection.remote.is_none())
            .map(|connection| async move {
                match connect_worker_host(&connection.host, ssh, name).await {
                    Ok((remote, instance)) => {
                        connection.remote = Some(remote);
                        connection.instance = Some(instance);
                        connection.last_error = None;
                    }
                    Err(error) => connection.last_error = Some(error),
                }
            });
        join_all(missing).await;
    }

    /// Opens the port forward to Redis and a connection through it, through the first
    /// connected worker host that works, unless one is open.
    async fn open_redis_link(&mut self) -> Result<(), String> {
        if self.redis.is_some() {
            return Ok(());
        }
        let mut failures = Vec::new();
        for connection in &self.connections {
            let Some(remote) = &connection.remote else {
                continue;
            };
            match self.open_link(remote).await {
                Ok(link) => {
                    self.redis = Some(link);
                    return Ok(());
                }
                Err(error) => failures.push(error),
            }
        }
        if failures.is_empty() {
            return Err("no worker host could be reached to forward Redis through".into());
        }
        Err(failures.join("; "))
    }

    /// Forwards a socket in a new private directory to Redis's address, connected to from
    /// `remote`, and connects through it.
    ///
    /// NOTE: no automated test runs the forward itself, because that needs an sshd. The
    /// lab is where it runs; the Redis reading behind it is tested on loopback.
    async fn open_link(&self, remote: &Remote) -> Result<RedisLink, String> {
        let dir = tempfile::Builder::new()
            .prefix("yametee-status-")
            .tempdir()
            .map_err(|error| format!("cannot create a private temporary directory: {error}"))?;
        let socket = dir.path().join("redis.sock");
        let redis_host = self.inventory.redis_host();
        let port = self.inventory.app.redis.port;
        remote
            .forward_local_socket(&socket, &redis_host.address.to_string(), port)
            .await
            .map_err(|error| error_chain(&error))?;

        let address = RedisAddress::Unix(socket);
        let password = self.secrets.get("app.redis.password");
        let connection = snapshot::connect(&address, password)
            .await
            .map_err(|error| {
                // The local socket is an internal detail; what the operator can act on is
                // the Redis server behind the forward.
                let mut cause: &dyn std::error::Error = &error;
                while let Some(source) = cause.source() {
                    cause = source;
                }
                format!(
                    "cannot reach Redis at {}:{port} from host {}: {cause}; is redis-server \
                     running on host {}, and may host {} reach it? `yametee-deploy verify`, with \
                     the same options, tells more",
                    redis_host.address,
                    remote.host(),
                    redis_host.name,
                    remote.host()
                )
            })?;
        tracing::debug!(host = %remote.host(), "forwarding Redis");
        Ok(RedisLink {
            _dir: dir,
            connection,
        })
    }
}

impl Connection {
    /// Builds the host's report from a journal read. When the read showed that the
    /// connection broke, it is taken out and returned for closing, so that the next
    /// refresh connects again.
    fn report(
        &mut self,
        journal: Option<Result<Vec<String>, SshError>>,
        secrets: &Secrets,
    ) -> (WorkerHost, Option<Remote>) {
        let mut host = WorkerHost {
            name: self.host.name.clone(),
            instance: self.instance.clone(),
            reachable: self.remote.is_some(),
            journal: Vec::new(),
            error: self.last_error.clone(),
        };
        match journal {
            None => (host, None),
            Some(Ok(lines)) => {
                host.journal = lines;
                (host, None)
            }
            Some(Err(error)) => {
                host.error = Some(secrets.redact(&error_chain(&error)));
                if !matches!(error, SshError::Run { .. }) {
                    return (host, None);
                }
                host.reachable = false;
                self.instance = None;
                (host, self.remote.take())
            }
        }
    }
}

/// Connects to a worker host and reads the instance name its worker runs as.
async fn connect_worker_host(
    host: &Host,
    ssh: &SshOverrides,
    worker_name: &str,
) -> Result<(Remote, String), String> {
    let remote = Remote::connect(Destination::for_host(host, ssh))
        .await
        .map_err(|error| error_chain(&error))?;
    // The worker names itself after the kernel's host name, which may differ from the
    // inventory's name for the host.
    let command = RemoteCommand::new("uname")
        .arg("-n")
        .timeout(REMOTE_READ_TIMEOUT);
    match remote.run(&command).await {
        Ok(output) => Ok((remote, format!("{worker_name}@{}", output.trim()))),
        Err(error) => {
            remote.close().await;
            Err(error_chain(&error))
        }
    }
}

/// Reads the last `lines` lines of the worker unit's journal, or `None` when the host is
/// not connected.
async fn read_journal(
    connection: &Connection,
    lines: usize,
) -> Option<Result<Vec<String>, SshError>> {
    let remote = connection.remote.as_ref()?;
    if lines == 0 {
        return Some(Ok(Vec::new()));
    }
    let command = journal_command(lines);
    let output = remote.run(&command).await;
    Some(output.map(|text| journal_lines(&text)))
}

/// Builds `journalctl -u yametee-worker -n N`, run as root because a login user may not
/// read the system journal.
pub fn journal_command(lines: usize) -> RemoteCommand {
    RemoteCommand::new("journalctl")
        .args(["--no-pager", "--quiet", "--output", "short-iso", "--unit"])
        .arg(worker_paths::UNIT)
        .arg("--lines")
        .arg(lines.to_string())
        .as_root()
        .timeout(REMOTE_READ_TIMEOUT)
}

/// Splits journalctl's output into lines, without blank ones and without the
/// "-- No entries --" marker of an empty journal.
fn journal_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty() && *line != "-- No entries --")
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_command_reads_worker_unit_as_root() {
        assert_eq!(
            journal_command(5).to_shell("deploy", true),
            "sudo -n -- journalctl --no-pager --quiet --output short-iso --unit \
             yametee-worker.service --lines 5"
        );
    }

    #[test]
    fn journal_lines_skip_empty_journal_marker() {
        assert_eq!(journal_lines("-- No entries --\n"), Vec::<String>::new());
        assert_eq!(journal_lines("a\n\nb  \n"), vec!["a", "b"]);
    }
}
