//! Turns the text of `inventory.yaml` into an [`Inventory`], collecting every problem with its
//! position instead of stopping at the first.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use saphyr::{LoadableYamlNode, MarkedYamlOwned, ScalarOwned, YamlDataOwned};

use super::suggest::closest_match;
use super::{
    App, Database, Host, Inventory, Problem, QueueThresholds, Redis, Role, SecretRef, Smtp,
    SshSettings, WebSettings, WorkerSettings,
};

type Node = MarkedYamlOwned;

/// Parses and validates an inventory; on failure returns every problem found, in file order.
pub fn parse_inventory(text: &str) -> Result<Inventory, Vec<Problem>> {
    let documents = MarkedYamlOwned::load_from_str(text).map_err(|error| {
        vec![Problem {
            line: error.marker().line(),
            column: error.marker().col() + 1,
            message: format!("invalid YAML: {}", error.info()),
        }]
    })?;
    let Some(root) = documents.first() else {
        return Err(vec![Problem {
            line: 1,
            column: 1,
            message: "the inventory is empty; expected a mapping with `hosts` and `app`".into(),
        }]);
    };

    let mut reader = Reader::default();
    let inventory = reader.inventory(root);
    match inventory {
        Some(inventory) if reader.problems.is_empty() => Ok(inventory),
        _ => {
            let mut problems = reader.problems;
            problems.sort_by_key(|problem| (problem.line, problem.column));
            problems.dedup();
            Err(problems)
        }
    }
}

/// Defaults applied where the inventory leaves a setting out.
mod default {
    pub const SSH_USER: &str = "deploy";
    pub const SSH_PORT: u16 = 22;
    pub const CONNECT_TIMEOUT_SECS: u64 = 10;
    pub const QUEUE: &str = "yametee:jobs";
    pub const WORKER_NAME: &str = "yametee-worker";
    pub const WORKER_CONCURRENCY: u32 = 4;
    pub const WORKER_READY_TIMEOUT_SECS: u64 = 30;
    pub const WORKER_MEMORY_BUDGET_MB: u64 = 200;
    pub const POSTGRES_PORT: u16 = 5432;
    /// Debian 12 ships PostgreSQL 15.
    pub const POSTGRES_VERSION: u32 = 15;
    pub const REDIS_PORT: u16 = 6379;
    pub const PENDING_THRESHOLD: u64 = 1000;
    pub const IN_FLIGHT_THRESHOLD: u64 = 100;
    pub const RETRY_THRESHOLD: u64 = 100;
    pub const DEAD_THRESHOLD: u64 = 1;
}

/// The fields of one YAML mapping, with the path used to name them in messages.
struct Mapping<'a> {
    path: String,
    node: &'a Node,
    entries: Vec<(String, &'a Node)>,
}

impl<'a> Mapping<'a> {
    fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, node)| *node)
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }
}

#[derive(Default)]
struct Reader {
    problems: Vec<Problem>,
    /// Roles of every host whose role list is valid, even when another of its settings is
    /// not, so the topology is checked in the same run.
    host_roles: Vec<Vec<Role>>,
    /// Every valid host address with its host name and node, for the duplicate check.
    host_addresses: Vec<(Ipv4Addr, String, Node)>,
}

impl Reader {
    fn report(&mut self, node: &Node, message: impl Into<String>) {
        self.problems.push(Problem {
            line: node.span.start.line(),
            column: node.span.start.col() + 1,
            message: message.into(),
        });
    }

    fn inventory(&mut self, root: &Node) -> Option<Inventory> {
        let top = self.mapping(root, "", &["defaults", "app", "hosts"])?;
        let ssh_defaults = self.ssh_defaults(&top);
        let app = self.required(&top, "app").and_then(|node| self.app(node));
        let hosts = self
            .required(&top, "hosts")
            .and_then(|node| self.hosts(node, &ssh_defaults));

        self.check_topology(root, &top);
        Some(Inventory {
            hosts: hosts?,
            app: app?,
        })
    }

    fn ssh_defaults(&mut self, top: &Mapping) -> SshSettings {
        let builtin = SshSettings {
            user: default::SSH_USER.into(),
            port: default::SSH_PORT,
            identity: None,
            known_hosts: None,
            sudo: true,
            connect_timeout_secs: default::CONNECT_TIMEOUT_SECS,
            key_exchange: None,
        };
        let Some(defaults) = top.get("defaults") else {
            return builtin;
        };
        let Some(defaults) = self.mapping(defaults, "defaults", &["ssh"]) else {
            return builtin;
        };
        match defaults.get("ssh") {
            Some(ssh) => self.ssh(ssh, "defaults.ssh", &builtin),
            None => builtin,
        }
    }

    fn ssh(&mut self, node: &Node, path: &str, base: &SshSettings) -> SshSettings {
        let keys = [
            "user",
            "port",
            "identity",
            "known_hosts",
            "sudo",
            "connect_timeout_secs",
            "key_exchange",
        ];
        let Some(ssh) = self.mapping(node, path, &keys) else {
            return base.clone();
        };
        SshSettings {
            user: self
                .optional_name(&ssh, "user")
                .unwrap_or_else(|| base.user.clone()),
            port: self.optional_port(&ssh, "port").unwrap_or(base.port),
            identity: self
                .optional_string(&ssh, "identity")
                .map(PathBuf::from)
                .or_else(|| base.identity.clone()),
            known_hosts: self
                .optional_string(&ssh, "known_hosts")
                .map(PathBuf::from)
                .or_else(|| base.known_hosts.clone()),
            sudo: self.optional_bool(&ssh, "sudo").unwrap_or(base.sudo),
            connect_timeout_secs: self
                .optional_integer(&ssh, "connect_timeout_secs", 1, 600)
                .unwrap_or(base.connect_timeout_secs),
            key_exchange: self
                .optional_key_exchange(&ssh)
                .or_else(|| base.key_exchange.clone()),
        }
    }

    /// Reads `key_exchange`: OpenSSH key exchange algorithm names separated by commas.
    fn optional_key_exchange(&mut self, mapping: &Mapping) -> Option<String> {
        let value = self.optional_string(mapping, "key_exchange")?;
        let valid = value.split(',').all(|name| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-@.+".contains(c))
        });
        if valid {
            return Some(value);
        }
        let node = mapping.get("key_exchange").expect("read above");
        let path = mapping.child_path("key_exchange");
        self.report(
            node,
            format!("{path} must be OpenSSH key exchange names separated by commas, such as curve25519-sha256"),
        );
        None
    }

    fn app(&mut self, node: &Node) -> Option<App> {
        let keys = [
            "database",
            "redis",
            "queue",
            "worker",
            "web",
            "smtp",
            "thresholds",
        ];
        let app = self.mapping(node, "app", &keys)?;
        let database = self
            .required(&app, "database")
            .and_then(|node| self.database(node));
        let redis = self
            .required(&app, "redis")
            .and_then(|node| self.redis(node));
        let queue = self
            .optional_queue_name(&app)
            .unwrap_or_else(|| default::QUEUE.into());
        let worker = self.worker(app.get("worker"));
        let web = self.web(app.get("web"));
        let thresholds = self.thresholds(app.get("thresholds"));
        let smtp = app.get("smtp").and_then(|node| self.smtp(node));
        Some(App {
            smtp,
            database: database?,
            redis: redis?,
            queue,
            worker,
            web,
            thresholds,
        })
    }

    fn database(&mut self, node: &Node) -> Option<Database> {
        let keys = ["name", "user", "password", "port", "version"];
        let database = self.mapping(node, "app.database", &keys)?;
        let name = self.required_identifier(&database, "name");
        let user = self.required_identifier(&database, "user");
        let password = self
            .required(&database, "password")
            .and_then(|node| self.secret_ref(node, &database.child_path("password")));
        let port = self
            .optional_port(&database, "port")
            .unwrap_or(default::POSTGRES_PORT);
        let version = self
            .optional_integer(&database, "version", 9, 99)
            .map(|version| version as u32)
            .unwrap_or(default::POSTGRES_VERSION);
        Some(Database {
            name: name?,
            user: user?,
            password: password?,
            port,
            version,
        })
    }

    fn redis(&mut self, node: &Node) -> Option<Redis> {
        let redis = self.mapping(node, "app.redis", &["password", "port", "maxmemory"])?;
        let password = self
            .required(&redis, "password")
            .and_then(|node| self.secret_ref(node, &redis.child_path("password")));
        let port = self
            .optional_port(&redis, "port")
            .unwrap_or(default::REDIS_PORT);
        let maxmemory = self.optional_string(&redis, "maxmemory");
        if let (Some(value), Some(node)) = (&maxmemory, redis.get("maxmemory")) {
            if !is_memory_size(value) {
                self.report(
                    node,
                    format!(
                    "invalid app.redis.maxmemory `{value}`; expected a size such as 256mb or 1gb"
                ),
                );
            }
        }
        Some(Redis {
            password: password?,
            port,
            maxmemory,
        })
    }

    fn smtp(&mut self, node: &Node) -> Option<Smtp> {
        let smtp = self.mapping(node, "app.smtp", &["url", "from"])?;
        let url = self
            .required(&smtp, "url")
            .and_then(|node| self.secret_ref(node, "app.smtp.url"));
        let from = self.optional_string(&smtp, "from");
        if let (Some(value), Some(node)) = (&from, smtp.get("from")) {
            if !value.contains('@') || value.chars().any(char::is_whitespace) {
                self.report(
                    node,
                    format!(
                        "invalid app.smtp.from `{value}`; expected an e-mail address such as \
                     noreply@example.com"
                    ),
                );
                return None;
            }
        }
        Some(Smtp { url: url?, from })
    }

    fn worker(&mut self, node: Option<&Node>) -> WorkerSettings {
        let mut worker = WorkerSettings {
            name: default::WORKER_NAME.into(),
            concurrency: default::WORKER_CONCURRENCY,
            ready_timeout_secs: default::WORKER_READY_TIMEOUT_SECS,
            memory_budget_mb: default::WORKER_MEMORY_BUDGET_MB,
        };
        let keys = [
            "name",
            "concurrency",
            "ready_timeout_secs",
            "memory_budget_mb",
        ];
        let Some(mapping) = node.and_then(|node| self.mapping(node, "app.worker", &keys)) else {
            return worker;
        };
        if let Some(name) = self.optional_name(&mapping, "name") {
            worker.name = name;
        }
        if let Some(concurrency) = self.optional_integer(&mapping, "concurrency", 1, 64) {
            worker.concurrency = concurrency as u32;
        }
        if let Some(timeout) = self.optional_integer(&mapping, "ready_timeout_secs", 1, 3600) {
            worker.ready_timeout_secs = timeout;
        }
        if let Some(budget) = self.optional_integer(&mapping, "memory_budget_mb", 1, 1 << 20) {
            worker.memory_budget_mb = budget;
        }
        worker
    }

    fn web(&mut self, node: Option<&Node>) -> WebSettings {
        let mut web = WebSettings {
            start_command: None,
            working_directory: None,
        };
        let keys = ["start_command", "working_directory"];
        if let Some(mapping) = node.and_then(|node| self.mapping(node, "app.web", &keys)) {
            web.start_command = self.optional_string(&mapping, "start_command");
            web.working_directory = self.optional_string(&mapping, "working_directory");
        }
        web
    }

    fn thresholds(&mut self, node: Option<&Node>) -> QueueThresholds {
        let mut thresholds = QueueThresholds {
            pending: default::PENDING_THRESHOLD,
            in_flight: default::IN_FLIGHT_THRESHOLD,
            retry: default::RETRY_THRESHOLD,
            dead: default::DEAD_THRESHOLD,
        };
        let keys = ["pending", "in_flight", "retry", "dead"];
        let Some(mapping) = node.and_then(|node| self.mapping(node, "app.thresholds", &keys))
        else {
            return thresholds;
        };
        let fields = [
            ("pending", &mut thresholds.pending),
            ("in_flight", &mut thresholds.in_flight),
            ("retry", &mut thresholds.retry),
            ("dead", &mut thresholds.dead),
        ];
        for (key, slot) in fields {
            if let Some(value) = self.optional_integer(&mapping, key, 1, u32::MAX as u64) {
                *slot = value;
            }
        }
        thresholds
    }

    fn hosts(&mut self, node: &Node, ssh_defaults: &SshSettings) -> Option<Vec<Host>> {
        let YamlDataOwned::Mapping(entries) = &node.data else {
            self.report(
                node,
                "`hosts` must be a mapping of host name to host settings",
            );
            return None;
        };
        if entries.is_empty() {
            self.report(node, "`hosts` is empty; expected at least one host");
            return None;
        }

        let mut hosts = Vec::new();
        let mut complete = true;
        for (key, value) in entries {
            let Some(name) = scalar_string(key) else {
                self.report(key, "a host name must be a string");
                complete = false;
                continue;
            };
            if !is_host_name(&name) {
                self.report(
                    key,
                    format!(
                        "invalid host name `{name}`; expected lowercase letters, digits and '-', \
                     starting with a letter, at most 63 characters"
                    ),
                );
                complete = false;
            }
            match self.host(name, value, ssh_defaults) {
                Some(host) => hosts.push(host),
                None => complete = false,
            }
        }
        complete.then_some(hosts)
    }

    fn host(&mut self, name: String, node: &Node, ssh_defaults: &SshSettings) -> Option<Host> {
        let path = format!("hosts.{name}");
        let host = self.mapping(node, &path, &["address", "roles", "ssh"])?;
        let address_node = self.required(&host, "address");
        let address = address_node.and_then(|node| self.ipv4(node, &path));
        if let (Some(address), Some(node)) = (address, address_node) {
            self.host_addresses
                .push((address, name.clone(), node.clone()));
        }
        let roles = self
            .required(&host, "roles")
            .and_then(|node| self.roles(node, &path));
        let ssh = match host.get("ssh") {
            Some(node) => self.ssh(node, &format!("{path}.ssh"), ssh_defaults),
            None => ssh_defaults.clone(),
        };
        Some(Host {
            name,
            address: address?,
            roles: roles?,
            ssh,
        })
    }

    fn ipv4(&mut self, node: &Node, host_path: &str) -> Option<Ipv4Addr> {
        let text = scalar_string(node).unwrap_or_default();
        match text.parse::<Ipv4Addr>() {
            Ok(address) => Some(address),
            Err(_) => {
                self.report(
                    node,
                    format!(
                        "invalid {host_path}.address `{text}`; expected an IPv4 address such as \
                     192.168.120.45"
                    ),
                );
                None
            }
        }
    }

    fn roles(&mut self, node: &Node, host_path: &str) -> Option<Vec<Role>> {
        let expected = "expected a list of roles from: postgres, redis, worker, web";
        let YamlDataOwned::Sequence(items) = &node.data else {
            self.report(
                node,
                format!("{host_path}.roles must be a list; {expected}"),
            );
            return None;
        };
        if items.is_empty() {
            self.report(node, format!("{host_path}.roles is empty; {expected}"));
            return None;
        }
        let mut roles = BTreeSet::new();
        let mut valid = true;
        for item in items {
            let text = scalar_string(item).unwrap_or_default();
            match Role::from_name(&text) {
                Some(role) if roles.contains(&role) => {
                    self.report(
                        item,
                        format!("role `{text}` is listed twice in {host_path}"),
                    );
                    valid = false;
                }
                Some(role) => {
                    roles.insert(role);
                }
                None => {
                    let role_names = Role::ALL.map(Role::as_str);
                    let message = match closest_match(&text, role_names) {
                        Some(role) => {
                            format!("unknown role `{text}` in {host_path}; did you mean `{role}`?")
                        }
                        None => format!("unknown role `{text}` in {host_path}; {expected}"),
                    };
                    self.report(item, message);
                    valid = false;
                }
            }
        }
        // The roles that were recognised count for the topology check even when another is
        // invalid, so an unknown role does not also report a missing postgres or redis host.
        let roles: Vec<Role> = roles.into_iter().collect();
        self.host_roles.push(roles.clone());
        valid.then_some(roles)
    }

    fn check_topology(&mut self, root: &Node, top: &Mapping) {
        let hosts_node = top.get("hosts").unwrap_or(root);
        // Without a single readable role list the hosts already have problems of their own,
        // and counting roles would only add noise.
        if top.get("hosts").is_none() || self.host_roles.is_empty() {
            return;
        }
        for role in [Role::Postgres, Role::Redis] {
            let count = self
                .host_roles
                .iter()
                .filter(|roles| roles.contains(&role))
                .count();
            if count == 0 {
                self.report(
                    hosts_node,
                    format!("no host has the role `{role}`; expected exactly one {role} host"),
                );
            } else if count > 1 {
                self.report(
                    hosts_node,
                    format!(
                        "{count} hosts have the role `{role}`; expected exactly one {role} host \
                     (replication is not managed)"
                    ),
                );
            }
        }

        let addresses = std::mem::take(&mut self.host_addresses);
        for (index, (address, name, node)) in addresses.iter().enumerate() {
            let earlier = addresses[..index]
                .iter()
                .find(|(other, _, _)| other == address);
            if let Some((_, other, _)) = earlier {
                self.report(
                    node,
                    format!(
                        "hosts.{name}.address {address} is already the address of host `{other}`"
                    ),
                );
            }
        }
    }

    // Typed field readers. Each reports its own problem and returns `None` on failure.

    fn mapping<'a>(&mut self, node: &'a Node, path: &str, keys: &[&str]) -> Option<Mapping<'a>> {
        let YamlDataOwned::Mapping(raw) = &node.data else {
            let what = if path.is_empty() {
                "the inventory"
            } else {
                path
            };
            self.report(
                node,
                format!("{what} must be a mapping with keys: {}", keys.join(", ")),
            );
            return None;
        };
        let mut entries = Vec::new();
        for (key, value) in raw {
            let Some(name) = scalar_string(key) else {
                self.report(key, "mapping keys must be strings");
                continue;
            };
            if !keys.contains(&name.as_str()) {
                let place = if path.is_empty() {
                    "at the top level".into()
                } else {
                    format!("in {path}")
                };
                let message = match closest_match(&name, keys.iter().copied()) {
                    Some(known) => format!("unknown key `{name}` {place}; did you mean `{known}`?"),
                    None => format!(
                        "unknown key `{name}` {place}; expected one of: {}",
                        keys.join(", ")
                    ),
                };
                self.report(key, message);
                continue;
            }
            entries.push((name, value));
        }
        Some(Mapping {
            path: path.to_string(),
            node,
            entries,
        })
    }

    fn required<'a>(&mut self, mapping: &Mapping<'a>, key: &str) -> Option<&'a Node> {
        let found = mapping.get(key);
        if found.is_none() {
            let place = if mapping.path.is_empty() {
                "at the top level".to_string()
            } else {
                format!("in {}", mapping.path)
            };
            self.report(mapping.node, format!("missing key `{key}` {place}"));
        }
        found
    }

    fn optional_string(&mut self, mapping: &Mapping, key: &str) -> Option<String> {
        let node = mapping.get(key)?;
        if matches!(node.data, YamlDataOwned::Value(ScalarOwned::Null)) {
            return None;
        }
        match &node.data {
            YamlDataOwned::Value(ScalarOwned::String(text)) if !text.is_empty() => {
                Some(text.clone())
            }
            _ => {
                let path = mapping.child_path(key);
                self.report(node, format!("{path} must be a non-empty string"));
                None
            }
        }
    }

    fn optional_name(&mut self, mapping: &Mapping, key: &str) -> Option<String> {
        let value = self.optional_string(mapping, key)?;
        if is_unix_name(&value) {
            return Some(value);
        }
        let path = mapping.child_path(key);
        self.report(mapping.get(key)?, format!(
            "invalid {path} `{value}`; expected letters, digits, '_' and '-', starting with a letter"
        ));
        None
    }

    fn required_identifier(&mut self, mapping: &Mapping, key: &str) -> Option<String> {
        let node = self.required(mapping, key)?;
        let path = mapping.child_path(key);
        let text = scalar_string(node).unwrap_or_default();
        if is_sql_identifier(&text) {
            return Some(text);
        }
        self.report(
            node,
            format!(
            "invalid {path} `{text}`; expected a PostgreSQL name: lowercase letters, digits and \
             '_', starting with a letter, at most 63 characters"
        ),
        );
        None
    }

    fn optional_queue_name(&mut self, mapping: &Mapping) -> Option<String> {
        let value = self.optional_string(mapping, "queue")?;
        let valid = value.len() <= 200
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-:.".contains(c));
        if valid {
            return Some(value);
        }
        self.report(
            mapping.get("queue")?,
            format!(
            "invalid app.queue `{value}`; expected a Redis key of letters, digits, '_', '-', ':' \
             and '.'"
        ),
        );
        None
    }

    fn optional_bool(&mut self, mapping: &Mapping, key: &str) -> Option<bool> {
        let node = mapping.get(key)?;
        if let YamlDataOwned::Value(ScalarOwned::Boolean(value)) = node.data {
            return Some(value);
        }
        let path = mapping.child_path(key);
        self.report(node, format!("{path} must be true or false"));
        None
    }

    fn optional_integer(
        &mut self,
        mapping: &Mapping,
        key: &str,
        min: u64,
        max: u64,
    ) -> Option<u64> {
        let node = mapping.get(key)?;
        if let YamlDataOwned::Value(ScalarOwned::Integer(value)) = node.data {
            if let Ok(value) = u64::try_from(value) {
                if (min..=max).contains(&value) {
                    return Some(value);
                }
            }
        }
        let path = mapping.child_path(key);
        let shown = scalar_string(node).unwrap_or_else(|| "a non-scalar value".into());
        self.report(
            node,
            format!("invalid {path} `{shown}`; expected a whole number from {min} to {max}"),
        );
        None
    }

    fn optional_port(&mut self, mapping: &Mapping, key: &str) -> Option<u16> {
        self.optional_integer(mapping, key, 1, 65535)
            .map(|port| port as u16)
    }

    fn secret_ref(&mut self, node: &Node, path: &str) -> Option<SecretRef> {
        let expected = "expected {env: NAME} or {file: PATH}; secrets are never written in \
                        the inventory";
        let YamlDataOwned::Mapping(entries) = &node.data else {
            self.report(
                node,
                format!("{path} must be a secret reference; {expected}"),
            );
            return None;
        };
        if entries.len() != 1 {
            self.report(
                node,
                format!("{path} must have exactly one key; {expected}"),
            );
            return None;
        }
        let (key, value) = entries.iter().next()?;
        let kind = scalar_string(key).unwrap_or_default();
        let text = scalar_string(value).unwrap_or_default();
        match kind.as_str() {
            "env" if is_env_name(&text) => Some(SecretRef::Env(text)),
            "env" => {
                self.report(
                    value,
                    format!(
                        "invalid environment variable name `{text}` in {path}; expected uppercase \
                     letters, digits and '_'"
                    ),
                );
                None
            }
            "file" if !text.is_empty() => Some(SecretRef::File(PathBuf::from(text))),
            "file" => {
                self.report(value, format!("{path}.file must be a path"));
                None
            }
            _ => {
                self.report(
                    key,
                    format!("unknown secret source `{kind}` in {path}; {expected}"),
                );
                None
            }
        }
    }
}

/// The text of a scalar node, whatever its YAML type; `None` for collections.
pub(super) fn scalar_string(node: &Node) -> Option<String> {
    match &node.data {
        YamlDataOwned::Value(scalar) => Some(match scalar {
            ScalarOwned::Null => String::new(),
            ScalarOwned::Boolean(value) => value.to_string(),
            ScalarOwned::Integer(value) => value.to_string(),
            ScalarOwned::FloatingPoint(value) => value.to_string(),
            ScalarOwned::String(value) => value.clone(),
        }),
        YamlDataOwned::Representation(text, _, _) => Some(text.clone()),
        _ => None,
    }
}

pub(super) fn is_host_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

pub(super) fn is_unix_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 32
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_sql_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn is_memory_size(value: &str) -> bool {
    let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &value[digits.len()..];
    !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && ["", "b", "kb", "mb", "gb"].contains(&unit.to_ascii_lowercase().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "\
app:
  database:
    name: yame_tee
    user: yametee_user
    password: {env: PG_PASSWORD}
  redis:
    password: {file: /run/secrets/redis}
hosts:
  db:
    address: 10.0.0.2
    roles: [postgres, redis]
  worker-1:
    address: 10.0.0.3
    roles: [worker]
    ssh: {user: ops, port: 2222}
";

    fn problems(text: &str) -> Vec<String> {
        parse_inventory(text)
            .expect_err("inventory should be rejected")
            .into_iter()
            .map(|problem| problem.to_string())
            .collect()
    }

    #[test]
    fn valid_inventory_gets_defaults() {
        let inventory = parse_inventory(VALID).expect("valid inventory");
        assert_eq!(inventory.hosts.len(), 2);
        assert_eq!(inventory.app.queue, "yametee:jobs");
        assert_eq!(
            inventory.app.database.password,
            SecretRef::Env("PG_PASSWORD".into())
        );
        assert_eq!(inventory.hosts[0].ssh.user, "deploy");
        assert_eq!(inventory.hosts[1].ssh.user, "ops");
        assert_eq!(inventory.hosts[1].ssh.port, 2222);
        assert_eq!(inventory.hosts[0].roles, vec![Role::Postgres, Role::Redis]);
        assert_eq!(inventory.postgres_host().name, "db");
    }

    #[test]
    fn every_problem_is_reported_with_position() {
        let text = "\
app:
  database:
    name: Yame-Tee
    user: yametee_user
    password: hunter2
  redis:
    password: {env: REDIS_PASSWORD}
  colour: blue
hosts:
  web:
    address: 192.168.120.500
    roles: [web, cache]
";
        let found = problems(text);
        assert_eq!(
            found,
            vec![
            "3:11: invalid app.database.name `Yame-Tee`; expected a PostgreSQL name: lowercase \
             letters, digits and '_', starting with a letter, at most 63 characters",
            "5:15: app.database.password must be a secret reference; expected {env: NAME} or \
             {file: PATH}; secrets are never written in the inventory",
            "8:3: unknown key `colour` in app; expected one of: database, redis, queue, worker, \
             web, smtp, thresholds",
            "10:3: no host has the role `postgres`; expected exactly one postgres host",
            "10:3: no host has the role `redis`; expected exactly one redis host",
            "11:14: invalid hosts.web.address `192.168.120.500`; expected an IPv4 address such as \
             192.168.120.45",
            "12:18: unknown role `cache` in hosts.web; expected a list of roles from: postgres, \
             redis, worker, web",
        ]
        );
    }

    #[test]
    fn topology_needs_one_postgres_and_one_redis() {
        let text = VALID.replace("[postgres, redis]", "[web]");
        let found = problems(&text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].contains("no host has the role `postgres`"),
            "{found:?}"
        );
        assert!(
            found[1].contains("no host has the role `redis`"),
            "{found:?}"
        );
    }

    #[test]
    fn duplicate_address_is_rejected() {
        let text = VALID.replace("10.0.0.3", "10.0.0.2");
        let found = problems(&text);
        assert_eq!(
            found,
            vec!["13:14: hosts.worker-1.address 10.0.0.2 is already the address of host `db`"]
        );
    }

    #[test]
    fn unknown_role_does_not_hide_known_ones() {
        let text = VALID.replace("[postgres, redis]", "[postgres, redis, mongodb]");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("11:30: unknown role `mongodb`"),
            "{found:?}"
        );
    }

    #[test]
    fn duplicate_address_found_beside_other_problems() {
        let text = VALID
            .replace("10.0.0.3", "10.0.0.2")
            .replace("port: 2222", "port: 0");
        let found = problems(&text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].contains("is already the address of host `db`"),
            "{found:?}"
        );
        assert!(found[1].contains("ssh.port `0`"), "{found:?}");
    }

    #[test]
    fn duplicate_role_is_rejected() {
        let text = VALID.replace("[worker]", "[worker, worker]");
        let found = problems(&text);
        assert_eq!(
            found,
            vec!["14:21: role `worker` is listed twice in hosts.worker-1"]
        );
    }

    #[test]
    fn misspelt_key_and_role_get_suggestion() {
        let text = VALID
            .replace("    address: 10.0.0.3", "    adress: 10.0.0.3")
            .replace("[worker]", "[wroker]");
        let found = problems(&text);
        assert_eq!(
            found,
            vec![
                "13:5: unknown key `adress` in hosts.worker-1; did you mean `address`?",
                "13:5: missing key `address` in hosts.worker-1",
                "14:13: unknown role `wroker` in hosts.worker-1; did you mean `worker`?",
            ]
        );
    }

    #[test]
    fn yaml_syntax_error_has_position() {
        let found = problems("hosts: [a\n");
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("2:1: invalid YAML:"), "{found:?}");
    }

    #[test]
    fn missing_sections_are_named() {
        let found = problems("defaults: {}\n");
        assert_eq!(
            found,
            vec![
                "1:1: missing key `app` at the top level",
                "1:1: missing key `hosts` at the top level",
            ]
        );
    }

    #[test]
    fn out_of_range_numbers_are_rejected() {
        let text = VALID.replace("port: 2222", "port: 70000");
        let found = problems(&text);
        assert_eq!(found, vec![
            "15:28: invalid hosts.worker-1.ssh.port `70000`; expected a whole number from 1 to 65535"
        ]);
    }
}
