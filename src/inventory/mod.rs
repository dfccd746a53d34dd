//! The inventory: which hosts exist, what roles they play and how to reach them.
//!
//! `inventory.yaml` is parsed into the validated [`Inventory`] model before anything connects
//! anywhere. Every problem in the file is collected with its line and column, so one run of
//! `inventory check` lists them all.

pub mod edit;
mod parse;
mod suggest;

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use parse::parse_inventory;

/// A validated inventory.
#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    pub hosts: Vec<Host>,
    pub app: App,
}

/// One machine of the deployment.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub name: String,
    pub address: Ipv4Addr,
    pub roles: Vec<Role>,
    pub ssh: SshSettings,
}

/// How to log in to a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SshSettings {
    pub user: String,
    pub port: u16,
    /// Private key handed to `ssh -i`; `None` leaves the choice to ssh's own configuration.
    pub identity: Option<PathBuf>,
    /// known_hosts file the host keys are checked against; `None` means ssh's default file.
    pub known_hosts: Option<PathBuf>,
    /// Whether commands that need root are run through `sudo -n`.
    pub sudo: bool,
    pub connect_timeout_secs: u64,
    /// OpenSSH `KexAlgorithms` value, such as `curve25519-sha256`; `None` keeps ssh's default.
    /// The default hybrid post-quantum exchange costs about ten times the CPU per connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_exchange: Option<String>,
}

/// What a host does in the deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Postgres,
    Redis,
    Worker,
    Web,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Postgres, Role::Redis, Role::Worker, Role::Web];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Postgres => "postgres",
            Role::Redis => "redis",
            Role::Worker => "worker",
            Role::Web => "web",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == name)
    }

    /// Tier in which hosts are converged: data stores first, then their clients.
    pub fn tier(self) -> u8 {
        match self {
            Role::Postgres | Role::Redis => 0,
            Role::Worker | Role::Web => 1,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a secret's value comes from. The value itself is never stored in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "environment variable {name}"),
            SecretRef::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// Settings of the application shared by every host.
#[derive(Debug, Clone, Serialize)]
pub struct App {
    pub database: Database,
    pub redis: Redis,
    pub queue: String,
    pub worker: WorkerSettings,
    pub web: WebSettings,
    pub thresholds: QueueThresholds,
    /// The relay the worker sends e-mail through; without it e-mail jobs wait in retries.
    pub smtp: Option<Smtp>,
}

/// The SMTP relay of the `email:send` jobs.
#[derive(Debug, Clone, Serialize)]
pub struct Smtp {
    /// `smtp://[user:password@]host[:port]`, a secret because it may hold a password.
    pub url: SecretRef,
    /// Sender address; the worker's default is `<worker name>@<host name>`.
    pub from: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Database {
    pub name: String,
    pub user: String,
    pub password: SecretRef,
    pub port: u16,
    /// PostgreSQL major version installed on the postgres hosts; it names the config directory.
    pub version: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Redis {
    pub password: SecretRef,
    pub port: u16,
    /// `maxmemory` directive, for example `256mb`; `None` leaves Redis's default.
    pub maxmemory: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerSettings {
    /// Name the worker logs itself under ("Worker <name> started").
    pub name: String,
    pub concurrency: u32,
    /// Seconds the new worker process has to report ready before apply rolls it back.
    pub ready_timeout_secs: u64,
    /// Resident memory above which the verification suite fails the worker.
    pub memory_budget_mb: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WebSettings {
    /// Command that starts the web platform; with `None` no web unit is installed.
    pub start_command: Option<String>,
    pub working_directory: Option<String>,
}

/// Queue depths at or above which the verification suite fails.
#[derive(Debug, Clone, Serialize)]
pub struct QueueThresholds {
    pub pending: u64,
    pub in_flight: u64,
    pub retry: u64,
    pub dead: u64,
}

impl Inventory {
    /// Reads and validates the inventory file at `path`.
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        parse_inventory(&text).map_err(|problems| InventoryError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|host| host.name == name)
    }

    pub fn hosts_with(&self, role: Role) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(move |host| host.has_role(role))
    }

    /// The one PostgreSQL host; validation guarantees it exists.
    pub fn postgres_host(&self) -> &Host {
        self.hosts_with(Role::Postgres)
            .next()
            .expect("validated inventory has a postgres host")
    }

    /// The one Redis host; validation guarantees it exists.
    pub fn redis_host(&self) -> &Host {
        self.hosts_with(Role::Redis)
            .next()
            .expect("validated inventory has a redis host")
    }

    /// Hosts that connect to PostgreSQL and Redis: the workers and the web platform.
    pub fn client_hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts
            .iter()
            .filter(|host| host.has_role(Role::Worker) || host.has_role(Role::Web))
    }

    /// Every secret the inventory refers to, keyed by the setting that uses it.
    pub fn secret_refs(&self) -> BTreeMap<&'static str, &SecretRef> {
        let mut refs = BTreeMap::from([
            ("app.database.password", &self.app.database.password),
            ("app.redis.password", &self.app.redis.password),
        ]);
        if let Some(smtp) = &self.app.smtp {
            refs.insert("app.smtp.url", &smtp.url);
        }
        refs
    }

    /// Returns the names of the hosts a command works on: all of them when `names` is empty,
    /// else the named ones. Rendering always uses the whole inventory, so working on some
    /// hosts never changes the firewall rules or pg_hba lines that concern the others.
    pub fn select(&self, names: &[String]) -> Result<Vec<String>, InventoryError> {
        if names.is_empty() {
            return Ok(self.hosts.iter().map(|host| host.name.clone()).collect());
        }
        let names: Vec<String> = names
            .iter()
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty())
            .collect();
        if names.is_empty() {
            // An unset variable in `--limit "$HOSTS"` must not select nothing and succeed.
            return Err(InventoryError::EmptyLimit);
        }
        let unknown: Vec<String> = names
            .iter()
            .filter(|name| self.host(name).is_none())
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(InventoryError::UnknownHosts {
                names: unknown,
                known: self.hosts.iter().map(|host| host.name.clone()).collect(),
            });
        }
        Ok(self
            .hosts
            .iter()
            .filter(|host| names.contains(&host.name))
            .map(|host| host.name.clone())
            .collect())
    }
}

impl Host {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Dependency tier of the host: the lowest tier of its roles.
    pub fn tier(&self) -> u8 {
        self.roles.iter().map(|role| role.tier()).min().unwrap_or(0)
    }
}

/// One problem found in an inventory file, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read inventory {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid inventory {}: {} problem{}\n{}", path.display(), problems.len(),
        if problems.len() == 1 { "" } else { "s" }, format_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
    #[error("unknown host{} in --limit: {}; the inventory has: {}",
        if names.len() == 1 { "" } else { "s" }, names.join(", "), known.join(", "))]
    UnknownHosts {
        names: Vec<String>,
        known: Vec<String>,
    },
    #[error(
        "--limit names no host; give host names separated by commas, or leave --limit out \
             to work on every host"
    )]
    EmptyLimit,
}

fn format_problems(path: &Path, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|problem| format!("  {}:{problem}", path.display()))
        .collect::<Vec<_>>()
        .join("\n")
}
