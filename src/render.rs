//! Renders each host's desired state from the inventory and the templates in `templates/`.
//!
//! Rendering needs no network: [`render_host`] is a pure function of the inventory and the
//! secret values, so `render --out` and the snapshot tests see exactly what `apply` writes.

use std::collections::BTreeSet;

use minijinja::{context, Environment, UndefinedBehavior, Value};
use serde::Serialize;

use crate::inventory::{Host, Inventory, Role};
use crate::secrets::Secrets;

/// Where the worker lives on a worker host.
pub mod worker_paths {
    pub const USER: &str = "yametee-worker";
    pub const UNIT: &str = "yametee-worker.service";
    pub const UNIT_FILE: &str = "/etc/systemd/system/yametee-worker.service";
    pub const ENV_FILE: &str = "/etc/yametee-worker/worker.env";
    pub const BASE_DIR: &str = "/opt/yametee-worker";
    pub const RELEASES_DIR: &str = "/opt/yametee-worker/releases";
    pub const CURRENT_LINK: &str = "/opt/yametee-worker/current";
    pub const BINARY_NAME: &str = "yametee-worker";
    /// File beside a release's binary holding its size, modification time and inode as
    /// installed, to notice cheaply that the binary was changed.
    pub const STAMP_NAME: &str = ".installed";
    /// Seconds the worker drains in-flight jobs after SIGTERM.
    pub const DRAIN_TIMEOUT_SECS: u64 = 30;
}

pub mod web_paths {
    pub const USER: &str = "yametee-web";
    pub const UNIT: &str = "yametee-web.service";
    pub const UNIT_FILE: &str = "/etc/systemd/system/yametee-web.service";
    pub const ENV_FILE: &str = "/etc/yametee-web/web.env";
}

pub const REDIS_DROP_IN: &str = "/etc/redis/yametee.conf";
pub const REDIS_MAIN_CONFIG: &str = "/etc/redis/redis.conf";
pub const REDIS_UNIT: &str = "redis-server.service";
pub const POSTGRES_UNIT: &str = "postgresql.service";
/// Rendered ufw rules of the host, the input `apply` synchronises ufw with.
pub const UFW_RULES_FILE: &str = "/etc/yametee/ufw.rules";

/// Action a host needs after one of its files changed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", content = "unit", rename_all = "kebab-case")]
pub enum Trigger {
    /// Restart the unit.
    Restart(String),
    /// Reload the unit's configuration without a restart.
    Reload(String),
    /// Run `systemctl daemon-reload` (a unit file changed).
    DaemonReload,
    /// Bring ufw's rules in line with the rendered rule list.
    SyncFirewall,
}

/// One file as it must be on a host.
#[derive(Debug, Clone, Serialize)]
pub struct RenderedFile {
    pub path: String,
    #[serde(skip)]
    pub content: String,
    pub mode: u32,
    pub owner: String,
    pub group: String,
    pub triggers: Vec<Trigger>,
}

/// A file whose desired content is computed from its current content on the host, such as a
/// line that must end a distribution's config file.
#[derive(Debug, Clone, Serialize)]
pub struct EnsuredLastLine {
    pub path: String,
    pub line: String,
    pub triggers: Vec<Trigger>,
}

/// A service that must be enabled and running on a host.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    pub unit: String,
}

/// Everything a host must look like after apply, before anything about the host is known.
#[derive(Debug, Clone, Serialize)]
pub struct DesiredHost {
    pub name: String,
    pub roles: Vec<Role>,
    pub packages: Vec<String>,
    pub system_users: Vec<String>,
    pub files: Vec<RenderedFile>,
    pub last_lines: Vec<EnsuredLastLine>,
    pub services: Vec<Service>,
    /// The ufw rules, in the order they are added.
    pub firewall_rules: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot render template {template} for host {host}")]
pub struct RenderError {
    pub host: String,
    pub template: &'static str,
    #[source]
    pub source: minijinja::Error,
}

/// Templates are compiled into the binary, so the installed tool needs no template directory.
const TEMPLATES: &[(&str, &str)] = &[
    (
        "common/ufw.rules",
        include_str!("../templates/common/ufw.rules.j2"),
    ),
    (
        "postgres/yametee.conf",
        include_str!("../templates/postgres/yametee.conf.j2"),
    ),
    (
        "postgres/pg_hba.conf",
        include_str!("../templates/postgres/pg_hba.conf.j2"),
    ),
    (
        "redis/yametee.conf",
        include_str!("../templates/redis/yametee.conf.j2"),
    ),
    (
        "worker/yametee-worker.service",
        include_str!("../templates/worker/yametee-worker.service.j2"),
    ),
    (
        "worker/worker.env",
        include_str!("../templates/worker/worker.env.j2"),
    ),
    ("web/web.env", include_str!("../templates/web/web.env.j2")),
    (
        "web/yametee-web.service",
        include_str!("../templates/web/yametee-web.service.j2"),
    ),
];

/// Debian packages each role needs.
pub fn role_packages(role: Role) -> &'static [&'static str] {
    match role {
        Role::Postgres => &["postgresql"],
        Role::Redis => &["redis-server"],
        // The clients let the verification suite test connectivity from the worker's own
        // network position, as an operator would by hand.
        Role::Worker => &["redis-tools", "postgresql-client"],
        Role::Web => &["redis-tools"],
    }
}

/// Packages every host needs.
pub const BASE_PACKAGES: &[&str] = &["ufw", "sudo"];

pub struct Renderer {
    env: Environment<'static>,
}

impl Default for Renderer {
    fn default() -> Self {
        Self::new()
    }
}

impl Renderer {
    pub fn new() -> Renderer {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(true);
        env.add_filter("redis_quote", redis_quote);
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .expect("bundled templates are valid");
        }
        Renderer { env }
    }

    /// Renders the desired state of `host`.
    pub fn render_host(
        &self,
        inventory: &Inventory,
        host: &Host,
        secrets: &Secrets,
    ) -> Result<DesiredHost, RenderError> {
        let context = template_context(inventory, host, secrets);
        let render = |template: &'static str| {
            self.env
                .get_template(template)
                .and_then(|compiled| compiled.render(&context))
                .map_err(|source| RenderError {
                    host: host.name.clone(),
                    template,
                    source,
                })
        };

        let mut desired = DesiredHost {
            name: host.name.clone(),
            roles: host.roles.clone(),
            packages: Vec::new(),
            system_users: Vec::new(),
            files: Vec::new(),
            last_lines: Vec::new(),
            services: Vec::new(),
            firewall_rules: Vec::new(),
        };
        let mut packages: BTreeSet<&str> = BASE_PACKAGES.iter().copied().collect();
        for role in &host.roles {
            packages.extend(role_packages(*role));
        }
        desired.packages = packages.into_iter().map(String::from).collect();

        let ufw_rules = render("common/ufw.rules")?;
        desired.firewall_rules = parse_rule_list(&ufw_rules);
        desired.files.push(file(
            UFW_RULES_FILE,
            ufw_rules,
            0o644,
            "root",
            vec![Trigger::SyncFirewall],
        ));

        if host.has_role(Role::Postgres) {
            let version = inventory.app.database.version;
            let dir = format!("/etc/postgresql/{version}/main");
            let restart = vec![Trigger::Restart(POSTGRES_UNIT.into())];
            let reload = vec![Trigger::Reload(POSTGRES_UNIT.into())];
            desired.files.push(file(
                &format!("{dir}/conf.d/yametee.conf"),
                render("postgres/yametee.conf")?,
                0o644,
                "postgres",
                restart,
            ));
            desired.files.push(file(
                &format!("{dir}/pg_hba.conf"),
                render("postgres/pg_hba.conf")?,
                0o640,
                "postgres",
                reload,
            ));
            desired.services.push(Service {
                unit: POSTGRES_UNIT.into(),
            });
        }

        if host.has_role(Role::Redis) {
            let restart = vec![Trigger::Restart(REDIS_UNIT.into())];
            desired.files.push(file(
                REDIS_DROP_IN,
                render("redis/yametee.conf")?,
                0o640,
                "redis",
                restart.clone(),
            ));
            desired.last_lines.push(EnsuredLastLine {
                path: REDIS_MAIN_CONFIG.into(),
                line: format!("include {REDIS_DROP_IN}"),
                triggers: restart,
            });
            desired.services.push(Service {
                unit: REDIS_UNIT.into(),
            });
        }

        if host.has_role(Role::Worker) {
            let restart = Trigger::Restart(worker_paths::UNIT.into());
            desired.system_users.push(worker_paths::USER.into());
            desired.files.push(file(
                worker_paths::UNIT_FILE,
                render("worker/yametee-worker.service")?,
                0o644,
                "root",
                vec![Trigger::DaemonReload, restart.clone()],
            ));
            let mut env_file = file(
                worker_paths::ENV_FILE,
                render("worker/worker.env")?,
                0o640,
                "root",
                vec![restart],
            );
            env_file.group = worker_paths::USER.into();
            desired.files.push(env_file);
            desired.services.push(Service {
                unit: worker_paths::UNIT.into(),
            });
        }

        if host.has_role(Role::Web) {
            let web = &inventory.app.web;
            let mut triggers = Vec::new();
            if web.start_command.is_some() {
                triggers.push(Trigger::Restart(web_paths::UNIT.into()));
            }
            let group = if web.start_command.is_some() {
                web_paths::USER
            } else {
                "root"
            };
            let mut env_file = file(
                web_paths::ENV_FILE,
                render("web/web.env")?,
                0o640,
                "root",
                triggers.clone(),
            );
            env_file.group = group.into();
            desired.files.push(env_file);
            if web.start_command.is_some() {
                desired.system_users.push(web_paths::USER.into());
                triggers.insert(0, Trigger::DaemonReload);
                desired.files.push(file(
                    web_paths::UNIT_FILE,
                    render("web/yametee-web.service")?,
                    0o644,
                    "root",
                    triggers,
                ));
                desired.services.push(Service {
                    unit: web_paths::UNIT.into(),
                });
            }
        }

        Ok(desired)
    }
}

fn file(
    path: &str,
    content: String,
    mode: u32,
    owner: &str,
    triggers: Vec<Trigger>,
) -> RenderedFile {
    RenderedFile {
        path: path.into(),
        content,
        mode,
        owner: owner.into(),
        group: owner.into(),
        triggers,
    }
}

/// The rules of a rendered ufw rule list: every line that is neither blank nor a comment.
pub fn parse_rule_list(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(String::from)
        .collect()
}

fn template_context(inventory: &Inventory, host: &Host, secrets: &Secrets) -> Value {
    let app = &inventory.app;
    let postgres = inventory.postgres_host();
    let redis = inventory.redis_host();
    let redis_password = secrets.get("app.redis.password");

    let database_url = format!(
        "postgres://{}:{}@{}:{}/{}",
        app.database.user,
        secrets.url_component("app.database.password"),
        postgres.address,
        app.database.port,
        app.database.name
    );
    let redis_url = format!(
        "redis://:{}@{}:{}/0",
        secrets.url_component("app.redis.password"),
        redis.address,
        app.redis.port
    );
    let clients: Vec<Value> = inventory
        .client_hosts()
        .map(|client| {
            let roles: Vec<&str> = client.roles.iter().map(|role| role.as_str()).collect();
            context! { name => client.name, address => client.address.to_string(), roles }
        })
        .collect();
    let roles: Vec<&str> = host.roles.iter().map(|role| role.as_str()).collect();

    context! {
        host => context! {
            name => host.name,
            address => host.address.to_string(),
            roles,
            ssh_port => host.ssh.port,
        },
        app => context! { queue => app.queue },
        database => context! {
            name => app.database.name,
            user => app.database.user,
            port => app.database.port,
            address => postgres.address.to_string(),
        },
        redis => context! {
            address => redis.address.to_string(),
            port => app.redis.port,
            maxmemory => app.redis.maxmemory,
        },
        worker => context! {
            name => app.worker.name,
            user => worker_paths::USER,
            concurrency => app.worker.concurrency,
            ready_timeout_secs => app.worker.ready_timeout_secs,
            drain_timeout_secs => worker_paths::DRAIN_TIMEOUT_SECS,
            env_file => worker_paths::ENV_FILE,
            current_dir => worker_paths::CURRENT_LINK,
        },
        web => context! {
            user => web_paths::USER,
            env_file => web_paths::ENV_FILE,
            start_command => app.web.start_command,
            working_directory => app.web.working_directory,
        },
        clients,
        smtp => app.smtp.as_ref().map(|smtp| context! {
            url => secrets.get("app.smtp.url"),
            from => smtp.from,
        }),
        database_url,
        redis_url,
        redis_password,
    }
}

/// Quotes a value for redis.conf, which splits arguments on spaces and honours double quotes.
fn redis_quote(value: String) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '\'' && c != '\\');
    if plain {
        return value;
    }
    let mut quoted = String::from("\"");
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            '\n' => quoted.push_str("\\n"),
            _ => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repository_inventory() -> Inventory {
        let text = include_str!("../inventory.yaml");
        crate::inventory::parse_inventory(text).expect("inventory.yaml is valid")
    }

    fn render_all() -> Vec<DesiredHost> {
        let inventory = repository_inventory();
        let secrets = Secrets::placeholders(&inventory);
        let renderer = Renderer::new();
        inventory
            .hosts
            .iter()
            .map(|host| {
                renderer
                    .render_host(&inventory, host, &secrets)
                    .expect("renders")
            })
            .collect()
    }

    #[test]
    fn rendered_files_match_snapshots() {
        for host in render_all() {
            for file in &host.files {
                let name = format!("{}{}", host.name, file.path.replace('/', "__"));
                insta::assert_snapshot!(name, file.content);
            }
        }
    }

    #[test]
    fn firewall_follows_topology() {
        let hosts = render_all();
        let rules = |name: &str| {
            hosts
                .iter()
                .find(|host| host.name == name)
                .expect("host")
                .firewall_rules
                .clone()
        };
        assert_eq!(
            rules("redis"),
            vec![
                "allow 22/tcp comment 'ssh'",
                "allow from 192.168.120.50 to any port 6379 proto tcp comment 'redis from web'",
                "allow from 192.168.120.45 to any port 6379 proto tcp comment 'redis from worker'",
            ]
        );
        assert_eq!(rules("worker"), vec!["allow 22/tcp comment 'ssh'"]);
        assert_eq!(
            rules("web"),
            vec![
                "allow 22/tcp comment 'ssh'",
                "allow 80/tcp comment 'http'",
                "allow 443/tcp comment 'https'",
            ]
        );
    }

    #[test]
    fn added_worker_gets_database_and_redis_access() {
        let mut inventory = repository_inventory();
        let mut second = inventory.host("worker").expect("worker host").clone();
        second.name = "worker-2".into();
        second.address = "192.168.120.46".parse().expect("address");
        inventory.hosts.push(second);

        let secrets = Secrets::placeholders(&inventory);
        let renderer = Renderer::new();
        let postgres = inventory.postgres_host().clone();
        let desired = renderer
            .render_host(&inventory, &postgres, &secrets)
            .expect("renders");
        let hba = &desired
            .files
            .iter()
            .find(|file| file.path.ends_with("pg_hba.conf"))
            .expect("hba")
            .content;
        assert!(hba.contains("192.168.120.46/32"), "{hba}");
        assert!(desired
            .firewall_rules
            .contains(&"allow from 192.168.120.46 to any port 5432 proto tcp comment 'postgres from worker-2'".to_string()));
    }

    #[test]
    fn secrets_appear_only_as_placeholders() {
        for host in render_all() {
            for file in host.files {
                assert!(
                    !file.content.contains("{{"),
                    "{}: unrendered tag",
                    file.path
                );
                if file.content.contains("REDIS_URL") {
                    assert!(
                        file.content
                            .contains("redis://:<secret:app.redis.password>@"),
                        "{}",
                        file.content
                    );
                }
            }
        }
    }

    #[test]
    fn smtp_relay_reaches_worker_env() {
        let text = include_str!("../inventory.yaml").replace(
            "  thresholds:",
            "  smtp:\n    url: {env: SMTP_RELAY_URL}\n    from: noreply@yametee.example\n  thresholds:",
        );
        let inventory = crate::inventory::parse_inventory(&text).expect("valid inventory");
        let secrets = Secrets::placeholders(&inventory);
        let worker = inventory.host("worker").expect("worker host");
        let desired = Renderer::new()
            .render_host(&inventory, worker, &secrets)
            .expect("renders");
        let env = &desired
            .files
            .iter()
            .find(|file| file.path.ends_with("worker.env"))
            .expect("env")
            .content;
        assert!(env.contains("SMTP_URL=<secret:app.smtp.url>\n"), "{env}");
        assert!(env.contains("SMTP_FROM=noreply@yametee.example\n"), "{env}");
    }

    #[test]
    fn redis_quote_escapes_specials() {
        assert_eq!(redis_quote("abc123".into()), "abc123");
        assert_eq!(redis_quote("a b\"c".into()), "\"a b\\\"c\"");
    }
}
