//! SSH to the hosts: one multiplexed OpenSSH connection per host, remote commands built as
//! argv and quoted by one helper, `sudo -n` for root, and a timeout on every command.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use openssh::{KnownHosts, Session, SessionBuilder, Stdio};
use tokio::io::AsyncWriteExt;

use crate::inventory::Host;

/// Most commands run at once over one connection. OpenSSH's sshd refuses sessions beyond its
/// `MaxSessions`, 10 by default, on one connection.
pub const MAX_SESSIONS_PER_HOST: usize = 6;

/// Default limit for one remote command.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Quotes `word` for a POSIX shell: words of safe characters stay as they are, anything else
/// is put in single quotes.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b));
    if safe {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r#"'\''"#))
}

/// A command to run on a host, kept as argv until it is sent.
#[derive(Debug, Clone)]
pub struct RemoteCommand {
    argv: Vec<String>,
    run_as: RunAs,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    /// Description of a script, shown in messages instead of its argv.
    label: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RunAs {
    LoginUser,
    Root,
    User(String),
}

impl RemoteCommand {
    pub fn new(program: &str) -> RemoteCommand {
        RemoteCommand {
            argv: vec![program.to_string()],
            run_as: RunAs::LoginUser,
            stdin: None,
            timeout: DEFAULT_COMMAND_TIMEOUT,
            label: None,
        }
    }

    /// Builds a shell script run by `sh -c`, with `args` as its positional parameters `$1`,
    /// `$2`, …. The script is a constant, and values only ever travel as arguments.
    pub fn script(label: &str, script: &str, args: &[&str]) -> RemoteCommand {
        let mut command = RemoteCommand::new("sh");
        command.label = Some(label.to_string());
        command
            .argv
            .extend(["-c".to_string(), script.to_string(), "sh".to_string()]);
        command.argv.extend(args.iter().map(|arg| arg.to_string()));
        command
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.argv.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.argv.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn as_root(mut self) -> Self {
        self.run_as = RunAs::Root;
        self
    }

    pub fn as_user(mut self, user: &str) -> Self {
        self.run_as = RunAs::User(user.to_string());
        self
    }

    /// Bytes written to the command's standard input; the way secrets reach a host, so they
    /// never appear in a process list.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Builds the command line sent to the host's shell. `login_user` decides whether root
    /// needs `sudo -n`.
    pub fn to_shell(&self, login_user: &str, use_sudo: bool) -> String {
        let mut words: Vec<String> = Vec::new();
        match &self.run_as {
            RunAs::LoginUser => {}
            RunAs::Root if login_user == "root" || !use_sudo => {}
            RunAs::Root => words.extend(["sudo".into(), "-n".into(), "--".into()]),
            RunAs::User(user) => words.extend([
                "sudo".into(),
                "-n".into(),
                "-u".into(),
                user.clone(),
                "--".into(),
            ]),
        }
        words.extend(self.argv.iter().cloned());
        words
            .iter()
            .map(|word| shell_quote(word))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Returns a short form for messages: the label of a script, or the program and its
    /// first arguments.
    /// Describes the command for a message: its label as it is, or its words in backticks.
    pub fn described(&self) -> String {
        match &self.label {
            Some(label) => label.clone(),
            None => format!("`{}`", self.summary()),
        }
    }

    pub fn summary(&self) -> String {
        if let Some(label) = &self.label {
            return label.clone();
        }
        let mut text = self
            .argv
            .iter()
            .take(6)
            .cloned()
            .collect::<Vec<_>>()
            .join(" ");
        if self.argv.len() > 6 {
            text.push_str(" …");
        }
        text
    }
}

/// Exit status and output of a finished remote command.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("ssh.key_exchange of host {host} names {}, which the local ssh does not support; \
             `ssh -Q kex` lists what it does: {}", unknown.join(", "), supported.join(", "))]
    UnsupportedKeyExchange {
        host: String,
        unknown: Vec<String>,
        supported: Vec<String>,
    },
    #[error("cannot write the ssh configuration for host {host} to {}", path.display())]
    Config {
        host: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to host {host} ({destination})")]
    Connect {
        host: String,
        destination: String,
        #[source]
        source: openssh::Error,
    },
    #[error("host key of {host} ({address}) does not match {}: the host sent {}; if the host was \
             reinstalled, remove the old key with `ssh-keygen -f {} -R {address}` and add the \
             new one", changed.offending, changed.fingerprint, changed.known_hosts)]
    HostKeyChanged {
        host: String,
        address: String,
        changed: HostKeyChange,
    },
    #[error(
        "host key of {host} ({address}) is not in the known_hosts file and strict checking \
             is on; add it (for example with `ssh-keyscan {address}`, after checking its \
             fingerprint) to the known_hosts file"
    )]
    HostKeyUnknown { host: String, address: String },
    #[error("connecting to host {host} ({destination}) timed out after {secs} s")]
    ConnectTimeout {
        host: String,
        destination: String,
        secs: u64,
    },
    #[error(
        "lost the SSH connection to host {host} during {command}; whether that command \
             took effect is unknown. Run apply again once the host is reachable: restarts owed \
             are recorded on the host"
    )]
    ConnectionLost { host: String, command: String },
    #[error("{command} on host {host} failed to run")]
    Run {
        host: String,
        command: String,
        #[source]
        source: openssh::Error,
    },
    #[error("{command} on host {host} timed out after {secs} s")]
    Timeout {
        host: String,
        command: String,
        secs: u64,
    },
    #[error("{}", failed_text(command, *labelled, host, status, stderr))]
    Failed {
        host: String,
        /// The command's label, or its words in backticks.
        command: String,
        /// Whether `command` is a label, a description such as `read the queue depths`.
        labelled: bool,
        status: String,
        stderr: String,
    },
    #[error("forwarding {local} to {target} through host {host} failed")]
    Forward {
        host: String,
        local: String,
        target: String,
        #[source]
        source: openssh::Error,
    },
    #[error(
        "sudo on host {host} requires a password for {command}; the user {user} needs \
             passwordless sudo (NOPASSWD) for it"
    )]
    SudoDenied {
        host: String,
        user: String,
        command: String,
    },
}

/// Report from ssh about a host key that differs from the pinned one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKeyChange {
    /// The key the host sent, such as `ED25519 key SHA256:…`.
    pub fingerprint: String,
    /// Location of the pinned key, such as `/path/known_hosts:4`.
    pub offending: String,
    pub known_hosts: String,
}

impl HostKeyChange {
    /// Reads ssh's "REMOTE HOST IDENTIFICATION HAS CHANGED" warning.
    fn parse(text: &str) -> Option<HostKeyChange> {
        if !text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
            return None;
        }
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let key_type = lines
            .iter()
            .find_map(|line| line.strip_prefix("The fingerprint for the "))
            .and_then(|rest| rest.split(" key sent").next())
            .unwrap_or("host");
        let fingerprint = lines
            .iter()
            .find(|line| line.starts_with("SHA256:"))
            .map(|line| line.trim_end_matches('.'))
            .unwrap_or("an unknown key");
        let offending = lines
            .iter()
            .find_map(|line| line.strip_prefix("Offending "))
            .and_then(|rest| rest.split_once(" key in "))
            .map(|(_, place)| place.to_string())
            .unwrap_or_else(|| "the known_hosts file".into());
        let known_hosts = offending
            .rsplit_once(':')
            .map_or(offending.as_str(), |(path, _)| path)
            .to_string();
        Some(HostKeyChange {
            fingerprint: format!("{key_type} key {fingerprint}"),
            offending,
            known_hosts,
        })
    }
}

/// Connection settings resolved for one host, after `--lab` overrides.
#[derive(Debug, Clone)]
pub struct Destination {
    pub host: String,
    pub address: String,
    pub user: String,
    pub port: u16,
    pub identity: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub sudo: bool,
    pub connect_timeout: Duration,
    pub key_exchange: Option<String>,
}

/// Connection overrides that apply to every host, as set by `--lab`.
#[derive(Debug, Clone, Default)]
pub struct SshOverrides {
    pub identity: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
}

impl Destination {
    pub fn for_host(host: &Host, overrides: &SshOverrides) -> Destination {
        Destination {
            host: host.name.clone(),
            address: host.address.to_string(),
            user: host.ssh.user.clone(),
            port: host.ssh.port,
            identity: overrides
                .identity
                .clone()
                .or_else(|| host.ssh.identity.clone().map(expand_home)),
            known_hosts: overrides
                .known_hosts
                .clone()
                .or_else(|| host.ssh.known_hosts.clone().map(expand_home)),
            sudo: host.ssh.sudo,
            connect_timeout: Duration::from_secs(host.ssh.connect_timeout_secs),
            key_exchange: host.ssh.key_exchange.clone(),
        }
    }
}

fn expand_home(path: PathBuf) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path,
    }
}

/// An open, multiplexed SSH connection to one host.
pub struct Remote {
    destination: Destination,
    session: Session,
    sessions: tokio::sync::Semaphore,
}

impl Remote {
    /// Opens the host's master connection. Host keys are checked strictly: an unknown or
    /// changed key refuses the connection.
    pub async fn connect(destination: Destination) -> Result<Remote, SshError> {
        let mut builder = SessionBuilder::default();
        builder
            .user(destination.user.clone())
            .port(destination.port)
            .known_hosts_check(KnownHosts::Strict)
            .connect_timeout(destination.connect_timeout)
            .server_alive_interval(Duration::from_secs(15));
        if let Some(identity) = &destination.identity {
            builder.keyfile(identity);
        }
        if let Some(known_hosts) = &destination.known_hosts {
            builder.user_known_hosts_file(known_hosts);
        }

        // openssh passes no arbitrary `-o` option, so a chosen key exchange goes into a
        // config file of its own that then includes the user's and the system's, as ssh
        // would read them. The first value ssh obtains wins, so the chosen one does.
        let config = match &destination.key_exchange {
            Some(algorithms) => {
                check_key_exchange(&destination.host, algorithms)?;
                let path = std::env::temp_dir().join(format!(
                    "yametee-deploy-{}-{}.ssh_config",
                    std::process::id(),
                    destination.host
                ));
                let text = format!(
                    "KexAlgorithms {algorithms}\nInclude ~/.ssh/config\nInclude /etc/ssh/ssh_config\n"
                );
                std::fs::write(&path, text).map_err(|source| SshError::Config {
                    host: destination.host.clone(),
                    path: path.clone(),
                    source,
                })?;
                builder.config_file(&path);
                Some(path)
            }
            None => None,
        };

        let target = format!(
            "{}@{}:{}",
            destination.user, destination.address, destination.port
        );
        // openssh's own timeout covers the TCP connect; this one also bounds authentication.
        let limit = destination.connect_timeout + Duration::from_secs(10);
        let connected =
            tokio::time::timeout(limit, builder.connect_mux(&destination.address)).await;
        if let Some(path) = config {
            // The master connection read it when it started.
            let _ = std::fs::remove_file(path);
        }
        let session = match connected {
            Ok(Ok(session)) => session,
            Ok(Err(source)) => {
                let text = error_text(&source);
                if let Some(changed) = HostKeyChange::parse(&text) {
                    return Err(SshError::HostKeyChanged {
                        host: destination.host.clone(),
                        address: destination.address.clone(),
                        changed,
                    });
                }
                if text.contains("Host key verification failed") {
                    return Err(SshError::HostKeyUnknown {
                        host: destination.host.clone(),
                        address: destination.address.clone(),
                    });
                }
                return Err(SshError::Connect {
                    host: destination.host.clone(),
                    destination: target,
                    source,
                });
            }
            Err(_) => {
                return Err(SshError::ConnectTimeout {
                    host: destination.host.clone(),
                    destination: target,
                    secs: limit.as_secs(),
                })
            }
        };
        Ok(Remote {
            destination,
            session,
            sessions: tokio::sync::Semaphore::new(MAX_SESSIONS_PER_HOST),
        })
    }

    pub fn host(&self) -> &str {
        &self.destination.host
    }

    /// Starts `line` in a new session. sshd can refuse a session for a moment after another
    /// closed, before it freed the old one, so a refused open is retried a few times; the
    /// command has not started when that happens.
    async fn spawn(
        &self,
        line: &str,
        with_stdin: bool,
    ) -> Result<openssh::Child<&Session>, openssh::Error> {
        const ATTEMPTS: u32 = 5;
        let mut attempt = 1;
        loop {
            let stdin = if with_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            };
            let spawned = self
                .session
                .raw_command(line)
                .stdin(stdin)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .await;
            match spawned {
                Err(error) if attempt < ATTEMPTS && is_session_refused(&error) => {
                    tracing::debug!(host = %self.destination.host, attempt, "session refused; retrying");
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Runs `command` and returns its output whatever its exit status.
    pub async fn output(&self, command: &RemoteCommand) -> Result<CommandOutput, SshError> {
        let line = command.to_shell(&self.destination.user, self.destination.sudo);
        tracing::debug!(host = %self.destination.host, command = %command.summary(), "run");
        let started = Instant::now();
        let run = async {
            let _session = self
                .sessions
                .acquire()
                .await
                .expect("semaphore is never closed");
            let mut child = self.spawn(&line, command.stdin.is_some()).await?;
            if let Some(bytes) = &command.stdin {
                if let Some(mut stdin) = child.stdin().take() {
                    // A command that exits without reading its input is not an error here;
                    // its exit status tells what happened.
                    let _ = stdin.write_all(bytes).await;
                    let _ = stdin.shutdown().await;
                }
            }
            child.wait_with_output().await
        };
        let output = match tokio::time::timeout(command.timeout, run).await {
            Ok(Ok(output)) => output,
            Ok(Err(openssh::Error::Disconnected | openssh::Error::SshMux(_)))
                if !self.is_alive().await =>
            {
                return Err(SshError::ConnectionLost {
                    host: self.destination.host.clone(),
                    command: command.described(),
                })
            }
            Ok(Err(source)) => {
                return Err(SshError::Run {
                    host: self.destination.host.clone(),
                    command: command.described(),
                    source,
                })
            }
            Err(_) => {
                return Err(SshError::Timeout {
                    host: self.destination.host.clone(),
                    command: command.described(),
                    secs: command.timeout.as_secs(),
                })
            }
        };
        tracing::debug!(
            host = %self.destination.host,
            command = %command.summary(),
            ms = started.elapsed().as_millis() as u64,
            "finished"
        );
        let result = CommandOutput {
            status: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        if !result.success() && is_sudo_password_prompt(&result.stderr) {
            return Err(SshError::SudoDenied {
                host: self.destination.host.clone(),
                user: self.destination.user.clone(),
                command: command.described(),
            });
        }
        Ok(result)
    }

    /// Runs `command` and returns its standard output; a non-zero exit is an error carrying
    /// the command's standard error.
    pub async fn run(&self, command: &RemoteCommand) -> Result<String, SshError> {
        let output = self.output(command).await?;
        if output.success() {
            return Ok(output.stdout);
        }
        Err(SshError::Failed {
            host: self.destination.host.clone(),
            command: command.described(),
            labelled: command.label.is_some(),
            status: describe_status(output.status),
            stderr: last_lines(&output.stderr, 5),
        })
    }

    /// Forwards connections made to the local Unix socket `local` through this connection
    /// to `address:port`, connected to from this host, as `ssh -L local:address:port`
    /// does. The forward lasts until the connection is closed.
    pub async fn forward_local_socket(
        &self,
        local: &std::path::Path,
        address: &str,
        port: u16,
    ) -> Result<(), SshError> {
        let forwarded = self
            .session
            .request_port_forward(
                openssh::ForwardType::Local,
                local,
                openssh::Socket::new(address, port),
            )
            .await;
        forwarded.map_err(|source| SshError::Forward {
            host: self.destination.host.clone(),
            local: local.display().to_string(),
            target: format!("{address}:{port}"),
            source,
        })
    }

    /// Tells whether the master connection still works.
    async fn is_alive(&self) -> bool {
        self.session.check().await.is_ok()
    }

    pub async fn close(self) {
        if let Err(error) = self.session.close().await {
            tracing::debug!(host = %self.destination.host, %error, "closing the ssh connection failed");
        }
    }
}

/// Checks that the local ssh supports every algorithm of an ssh_config `KexAlgorithms` value, so
/// that a typing mistake is named before any connection instead of failing inside ssh.
fn check_key_exchange(host: &str, algorithms: &str) -> Result<(), SshError> {
    static SUPPORTED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let supported = SUPPORTED.get_or_init(|| {
        std::process::Command::new("ssh")
            .args(["-Q", "kex"])
            .output()
            .map(|output| {
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .map(|line| line.trim().to_string())
                    .filter(|line| !line.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    });
    if supported.is_empty() {
        // Without the list, ssh itself reports a value it does not support.
        return Ok(());
    }
    // A leading +, - or ^ adds to, removes from or puts first in ssh's default list.
    let names = algorithms.trim_start_matches(['+', '-', '^']).split(',');
    let unknown: Vec<String> = names
        .filter(|name| !name.contains(['*', '?']) && !supported.iter().any(|known| known == name))
        .map(String::from)
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(SshError::UnsupportedKeyExchange {
        host: host.to_string(),
        unknown,
        supported: supported.clone(),
    })
}

/// Formats the message of [`SshError::Failed`]. A label reads as what could not be done,
/// "cannot read the queue depths on host redis: … (it exited with status 1)". A command is
/// quoted, "`ufw enable` on host redis exited with status 1: …".
fn failed_text(command: &str, labelled: bool, host: &str, status: &str, stderr: &str) -> String {
    match (labelled, stderr.is_empty()) {
        (true, true) => format!("cannot {command} on host {host}: it {status}"),
        (true, false) => format!("cannot {command} on host {host}: {stderr} (it {status})"),
        (false, true) => format!("{command} on host {host} {status}"),
        (false, false) => format!("{command} on host {host} {status}: {stderr}"),
    }
}

/// Describes an exit status for messages. 124 is what coreutils' `timeout`, which the remote
/// scripts wrap around network clients, exits with when its limit ran out.
fn describe_status(status: Option<i32>) -> String {
    match status {
        None => "was killed by a signal".into(),
        Some(124) => "timed out (exit status 124 from `timeout`)".into(),
        Some(code) => format!("exited with status {code}"),
    }
}

/// Joins the message of `error` and of every cause under it, one per line.
fn error_text(error: &openssh::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push('\n');
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn is_session_refused(error: &openssh::Error) -> bool {
    error_text(error).contains("Session open refused")
}

fn is_sudo_password_prompt(stderr: &str) -> bool {
    stderr.contains("sudo: a password is required")
        || stderr.contains("sudo: a terminal is required")
}

/// Returns the last `count` non-empty lines of `text`, joined by "; ", for error messages.
pub fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let start = lines.len().saturating_sub(count);
    lines[start..].join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_exchange_names_are_checked_against_local_ssh() {
        // Needs the ssh client, which scripts/setup.sh installs.
        assert!(check_key_exchange("web", "curve25519-sha256").is_ok());
        assert!(check_key_exchange("web", "+curve25519-sha256,sntrup761x25519-sha512").is_ok());
        let error = check_key_exchange("web", "curve25519-sha256,curve25519-sha999")
            .expect_err("an unknown name is refused");
        let message = error.to_string();
        assert!(message.contains("names curve25519-sha999,"), "{message}");
        assert!(!message.contains("names curve25519-sha256"), "{message}");
    }

    #[test]
    fn shell_quote_leaves_safe_words() {
        assert_eq!(
            shell_quote("/etc/redis/redis.conf"),
            "/etc/redis/redis.conf"
        );
        assert_eq!(shell_quote("yametee:jobs"), "yametee:jobs");
    }

    #[test]
    fn shell_quote_wraps_specials() {
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r#"'it'\''s'"#);
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(shell_quote("a;b|c&d>e"), "'a;b|c&d>e'");
    }

    #[test]
    fn root_commands_use_sudo_unless_root() {
        let command = RemoteCommand::new("systemctl")
            .args(["restart", "redis-server.service"])
            .as_root();
        assert_eq!(
            command.to_shell("deploy", true),
            "sudo -n -- systemctl restart redis-server.service"
        );
        assert_eq!(
            command.to_shell("root", true),
            "systemctl restart redis-server.service"
        );
        assert_eq!(
            command.to_shell("deploy", false),
            "systemctl restart redis-server.service"
        );
    }

    #[test]
    fn user_commands_use_sudo_u() {
        let command = RemoteCommand::new("psql")
            .arg("-c")
            .arg("SELECT 1")
            .as_user("postgres");
        assert_eq!(
            command.to_shell("deploy", true),
            "sudo -n -u postgres -- psql -c 'SELECT 1'"
        );
    }

    #[test]
    fn script_passes_values_as_arguments() {
        let command = RemoteCommand::script("read a file", "cat -- \"$1\"", &["/tmp/a b"]);
        assert_eq!(
            command.to_shell("deploy", true),
            r#"sh -c 'cat -- "$1"' sh '/tmp/a b'"#
        );
        assert_eq!(command.summary(), "read a file");
    }

    #[test]
    fn host_key_change_is_read_from_ssh_warning() {
        let text = "failed to connect: @@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n\
                    The fingerprint for the ED25519 key sent by the remote host is\n\
                    SHA256:xsQXaBRuwCk.\n\
                    Offending ED25519 key in /var/lab/known_hosts:4\n\
                    Host key verification failed.";
        let change = HostKeyChange::parse(text).expect("recognised");
        assert_eq!(change.fingerprint, "ED25519 key SHA256:xsQXaBRuwCk");
        assert_eq!(change.offending, "/var/lab/known_hosts:4");
        assert_eq!(change.known_hosts, "/var/lab/known_hosts");
        assert_eq!(HostKeyChange::parse("Connection refused"), None);
    }

    #[test]
    fn last_lines_skips_blanks() {
        assert_eq!(last_lines("a\n\nb\nc\n", 2), "b; c");
    }
}
