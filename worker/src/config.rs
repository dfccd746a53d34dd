//! Worker settings read from the environment and validated before anything connects.
//!
//! Validation collects every problem instead of stopping at the first, so an operator
//! fixing an env file gets the whole list in one start attempt.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::redact::{percent_decode, redact_url, url_passwords};

/// Queue list used when `QUEUE_NAME` is not set; the web platform pushes jobs here.
pub const DEFAULT_QUEUE: &str = "yametee:jobs";
/// Worker name used when `WORKER_NAME` is not set; it appears in the startup log lines.
pub const DEFAULT_WORKER_NAME: &str = "yametee-worker";
/// Jobs processed at the same time when `WORKER_CONCURRENCY` is not set.
pub const DEFAULT_CONCURRENCY: usize = 1;
/// Upper bound of `WORKER_CONCURRENCY`. Each concurrent job uses its own PostgreSQL
/// connection, and PostgreSQL's default `max_connections` is 100.
pub const MAX_CONCURRENCY: usize = 64;
/// Seconds a shutdown waits for running jobs when `WORKER_DRAIN_TIMEOUT_SECS` is not set.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 30;
/// Upper bound of `WORKER_DRAIN_TIMEOUT_SECS`, one hour.
pub const MAX_DRAIN_TIMEOUT_SECS: u64 = 3600;

/// SMTP port used when `SMTP_URL` names none.
pub const DEFAULT_SMTP_PORT: u16 = 25;

const DATABASE_URL_FORMAT: &str = "postgres://USER:PASSWORD@HOST:PORT/DATABASE";
const REDIS_URL_FORMAT: &str = "redis://:PASSWORD@HOST:PORT/DB";
const SMTP_URL_FORMAT: &str = "smtp://[USER:PASSWORD@]HOST[:PORT]";

/// Validated worker settings.
#[derive(Clone)]
pub struct Config {
    /// PostgreSQL connection URL; contains the database password.
    pub database_url: String,
    /// Redis connection URL; contains the Redis password.
    pub redis_url: String,
    /// Redis list that producers push jobs onto; other keys are named after it.
    pub queue: String,
    /// Name in the log lines and the first half of the worker instance name.
    pub worker_name: String,
    /// Maximum number of jobs processed at the same time.
    pub concurrency: usize,
    /// Time that running jobs get to finish after SIGTERM or SIGINT.
    pub drain_timeout: Duration,
    /// Relay for `email:send`, or `None` when `SMTP_URL` is not set.
    pub smtp: Option<SmtpRelay>,
    /// Sender address of e-mail from `SMTP_FROM`, or `None` for the default
    /// `<worker name>@<host name>`.
    pub smtp_from: Option<String>,
}

/// SMTP relay settings parsed from `SMTP_URL`.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpRelay {
    /// The URL as set, for logging through [`redact_url`] and for [`Config::secrets`].
    pub url: String,
    pub host: String,
    pub port: u16,
    /// User name and password for SMTP AUTH, when the URL has them.
    pub credentials: Option<(String, String)>,
}

impl fmt::Debug for SmtpRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.url))
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field("queue", &self.queue)
            .field("worker_name", &self.worker_name)
            .field("concurrency", &self.concurrency)
            .field("drain_timeout", &self.drain_timeout)
            .field("smtp", &self.smtp)
            .field("smtp_from", &self.smtp_from)
            .finish()
    }
}

/// One invalid or missing environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Name of the environment variable.
    pub variable: &'static str,
    /// Description of the problem and of the expected value, without any password.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.variable, self.message)
    }
}

impl Config {
    /// Reads and validates the settings from the process environment.
    pub fn from_env() -> Result<Config, Vec<ConfigProblem>> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads and validates the settings through `lookup`, which returns a variable's
    /// value or `None` when it is not set.
    ///
    /// Returns every problem found. An optional variable set to the empty string counts
    /// as not set, as an env file line `NAME=` usually means "use the default".
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigProblem>> {
        let mut problems = Vec::new();

        let database_url = required(&lookup, "DATABASE_URL", DATABASE_URL_FORMAT, &mut problems);
        if let Some(url) = &database_url {
            problems.extend(check_database_url(url));
        }

        let redis_url = required(&lookup, "REDIS_URL", REDIS_URL_FORMAT, &mut problems);
        if let Some(url) = &redis_url {
            problems.extend(check_redis_url(url));
        }

        let queue = optional(&lookup, "QUEUE_NAME").unwrap_or_else(|| DEFAULT_QUEUE.to_string());
        problems.extend(check_queue_name(&queue));

        let worker_name =
            optional(&lookup, "WORKER_NAME").unwrap_or_else(|| DEFAULT_WORKER_NAME.to_string());
        problems.extend(check_worker_name(&worker_name));

        let concurrency = match optional(&lookup, "WORKER_CONCURRENCY") {
            None => Some(DEFAULT_CONCURRENCY),
            Some(value) => parse_in_range(&value, 1, MAX_CONCURRENCY).or_else(|| {
                problems.push(ConfigProblem {
                    variable: "WORKER_CONCURRENCY",
                    message: format!(
                        "must be a whole number from 1 to {MAX_CONCURRENCY}, got {value:?}"
                    ),
                });
                None
            }),
        };

        let drain_timeout_secs = match optional(&lookup, "WORKER_DRAIN_TIMEOUT_SECS") {
            None => Some(DEFAULT_DRAIN_TIMEOUT_SECS),
            Some(value) => parse_in_range(&value, 0, MAX_DRAIN_TIMEOUT_SECS).or_else(|| {
                problems.push(ConfigProblem {
                    variable: "WORKER_DRAIN_TIMEOUT_SECS",
                    message: format!(
                        "must be a whole number of seconds from 0 to {MAX_DRAIN_TIMEOUT_SECS}, got {value:?}"
                    ),
                });
                None
            }),
        };

        let smtp = optional(&lookup, "SMTP_URL").and_then(|url| {
            parse_smtp_url(&url)
                .map_err(|problem| problems.push(problem))
                .ok()
        });

        let smtp_from = optional(&lookup, "SMTP_FROM");
        if let Some(from) = &smtp_from {
            problems.extend(check_smtp_from(from));
        }

        match (database_url, redis_url, concurrency, drain_timeout_secs) {
            (Some(database_url), Some(redis_url), Some(concurrency), Some(drain_secs))
                if problems.is_empty() =>
            {
                Ok(Config {
                    database_url,
                    redis_url,
                    queue,
                    worker_name,
                    concurrency,
                    drain_timeout: Duration::from_secs(drain_secs),
                    smtp,
                    smtp_from,
                })
            }
            _ => Err(problems),
        }
    }

    /// Returns the passwords in the connection URLs, for scrubbing client error messages.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = url_passwords(&self.database_url);
        secrets.extend(url_passwords(&self.redis_url));
        if let Some(smtp) = &self.smtp {
            secrets.extend(url_passwords(&smtp.url));
        }
        secrets
    }
}

fn required(
    lookup: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    format: &str,
    problems: &mut Vec<ConfigProblem>,
) -> Option<String> {
    match lookup(variable) {
        None => {
            problems.push(ConfigProblem {
                variable,
                message: format!("is not set: expected {format}"),
            });
            None
        }
        Some(value) if value.trim().is_empty() => {
            problems.push(ConfigProblem {
                variable,
                message: format!("is empty: expected {format}"),
            });
            None
        }
        Some(value) => Some(value.trim().to_string()),
    }
}

fn optional(lookup: &impl Fn(&str) -> Option<String>, variable: &str) -> Option<String> {
    lookup(variable)
        .map(|value| value.trim().to_string())
        .filter(|value| !value.is_empty())
}

fn parse_in_range<T: FromStr + PartialOrd>(value: &str, min: T, max: T) -> Option<T> {
    value
        .parse::<T>()
        .ok()
        .filter(|parsed| *parsed >= min && *parsed <= max)
}

/// Checks the parts of a URL that both connection URLs need.
fn parse_url(variable: &'static str, url: &str, format: &str) -> Result<url::Url, ConfigProblem> {
    let shown = redact_url(url);
    let parsed = url::Url::parse(url).map_err(|error| ConfigProblem {
        variable,
        message: format!("is not a valid URL ({error}) in {shown}: expected {format}"),
    })?;

    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(ConfigProblem {
            variable,
            message: format!("has no host in {shown}: expected {format}"),
        });
    }
    Ok(parsed)
}

fn check_database_url(url: &str) -> Vec<ConfigProblem> {
    let variable = "DATABASE_URL";
    let shown = redact_url(url);
    let parsed = match parse_url(variable, url, DATABASE_URL_FORMAT) {
        Ok(parsed) => parsed,
        Err(problem) => return vec![problem],
    };
    let problem = |message: String| vec![ConfigProblem { variable, message }];

    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return problem(format!(
            "has scheme {:?} in {shown}: expected postgres:// or postgresql://",
            parsed.scheme()
        ));
    }
    if parsed.path().trim_start_matches('/').is_empty() {
        return problem(format!(
            "has no database name in {shown}: expected {DATABASE_URL_FORMAT}"
        ));
    }

    // The PostgreSQL client parses the URL again when connecting. Running its parser now
    // turns a bad option into a start-up problem instead of a connection failure.
    let config = match tokio_postgres::Config::from_str(url) {
        Ok(config) => config,
        Err(error) => {
            return problem(format!(
                "is not accepted by the PostgreSQL client ({}) in {shown}",
                crate::error_chain(&error)
            ))
        }
    };
    if !matches!(
        config.get_ssl_mode(),
        tokio_postgres::config::SslMode::Disable | tokio_postgres::config::SslMode::Prefer
    ) {
        return problem(format!(
            "requires TLS (sslmode) in {shown}, which this worker does not support: \
             use sslmode=disable or prefer, on a private network"
        ));
    }
    Vec::new()
}

fn check_redis_url(url: &str) -> Vec<ConfigProblem> {
    let variable = "REDIS_URL";
    let shown = redact_url(url);
    let parsed = match parse_url(variable, url, REDIS_URL_FORMAT) {
        Ok(parsed) => parsed,
        Err(problem) => return vec![problem],
    };
    let problem = |message: String| vec![ConfigProblem { variable, message }];

    match parsed.scheme() {
        "redis" => {}
        "rediss" => {
            return problem(format!(
                "uses rediss:// (TLS) in {shown}, which this worker does not support: use redis://"
            ))
        }
        other => {
            return problem(format!(
                "has scheme {other:?} in {shown}: expected {REDIS_URL_FORMAT}"
            ))
        }
    }

    let database = parsed.path().trim_start_matches('/');
    if !database.is_empty() && database.parse::<u16>().is_err() {
        return problem(format!(
            "has database {database:?} in {shown}: expected a database number such as /0"
        ));
    }

    // The Redis client's own parser catches what the checks above miss.
    if let Err(error) = redis::Client::open(url) {
        return problem(format!(
            "is not accepted by the Redis client ({}) in {shown}",
            crate::error_chain(&error)
        ));
    }
    Vec::new()
}

fn parse_smtp_url(url: &str) -> Result<SmtpRelay, ConfigProblem> {
    let variable = "SMTP_URL";
    let shown = redact_url(url);
    let parsed = parse_url(variable, url, SMTP_URL_FORMAT)?;
    let problem = |message: String| ConfigProblem { variable, message };

    match parsed.scheme() {
        "smtp" => {}
        "smtps" => {
            return Err(problem(format!(
                "uses smtps:// (TLS) in {shown}, which this worker does not support: \
                 use smtp:// to a relay on a private network"
            )))
        }
        other => {
            return Err(problem(format!(
                "has scheme {other:?} in {shown}: expected {SMTP_URL_FORMAT}"
            )))
        }
    }
    if !parsed.path().trim_start_matches('/').is_empty() || parsed.query().is_some() {
        return Err(problem(format!(
            "has a path or query in {shown}, which the worker does not read: expected {SMTP_URL_FORMAT}"
        )));
    }

    let credentials = match (parsed.username(), parsed.password()) {
        ("", None) => None,
        (user, Some(password)) if !user.is_empty() => {
            Some((percent_decode(user), percent_decode(password)))
        }
        _ => {
            return Err(problem(format!(
                "has a user name without a password, or a password without a user name, in {shown}"
            )))
        }
    };

    Ok(SmtpRelay {
        url: url.to_string(),
        host: parsed.host_str().unwrap_or_default().to_string(),
        port: parsed.port().unwrap_or(DEFAULT_SMTP_PORT),
        credentials,
    })
}

fn check_smtp_from(from: &str) -> Vec<ConfigProblem> {
    if from.parse::<lettre::message::Mailbox>().is_ok() {
        return Vec::new();
    }
    vec![ConfigProblem {
        variable: "SMTP_FROM",
        message: format!(
            "is not a valid sender address, got {from:?}: expected name@example.com or \
             \"Name <name@example.com>\""
        ),
    }]
}

fn check_queue_name(queue: &str) -> Vec<ConfigProblem> {
    if queue.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return vec![ConfigProblem {
            variable: "QUEUE_NAME",
            message: format!("must not contain spaces or control characters, got {queue:?}"),
        }];
    }
    Vec::new()
}

fn check_worker_name(name: &str) -> Vec<ConfigProblem> {
    // The name becomes part of Redis keys and of `name@host`, so '@', ':' and glob
    // characters are kept out.
    let valid = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid && name.len() <= 64 {
        return Vec::new();
    }
    vec![ConfigProblem {
        variable: "WORKER_NAME",
        message: format!("must be at most 64 letters, digits, '.', '_' or '-', got {name:?}"),
    }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const GOOD_DATABASE_URL: &str = "postgres://yametee_user:pgpass@127.0.0.1:5432/yame_tee";
    const GOOD_REDIS_URL: &str = "redis://:redispass@127.0.0.1:6379/0";

    fn config_from(pairs: &[(&str, &str)]) -> Result<Config, Vec<ConfigProblem>> {
        let environment: HashMap<String, String> = pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        Config::from_lookup(|name| environment.get(name).cloned())
    }

    fn problem_variables(problems: &[ConfigProblem]) -> Vec<&'static str> {
        problems.iter().map(|problem| problem.variable).collect()
    }

    #[test]
    fn defaults_apply_when_only_urls_are_set() {
        let config = config_from(&[
            ("DATABASE_URL", GOOD_DATABASE_URL),
            ("REDIS_URL", GOOD_REDIS_URL),
        ])
        .unwrap();

        assert_eq!(config.queue, "yametee:jobs");
        assert_eq!(config.worker_name, "yametee-worker");
        assert_eq!(config.concurrency, 1);
        assert_eq!(config.drain_timeout, Duration::from_secs(30));
        assert_eq!(config.smtp, None);
        assert_eq!(config.smtp_from, None);
    }

    #[test]
    fn explicit_values_override_defaults() {
        let config = config_from(&[
            ("DATABASE_URL", GOOD_DATABASE_URL),
            ("REDIS_URL", GOOD_REDIS_URL),
            ("QUEUE_NAME", "staging:jobs"),
            ("WORKER_NAME", "worker-2"),
            ("WORKER_CONCURRENCY", "8"),
            ("WORKER_DRAIN_TIMEOUT_SECS", "0"),
        ])
        .unwrap();

        assert_eq!(config.queue, "staging:jobs");
        assert_eq!(config.worker_name, "worker-2");
        assert_eq!(config.concurrency, 8);
        assert_eq!(config.drain_timeout, Duration::ZERO);
    }

    #[test]
    fn empty_optional_variable_uses_default() {
        let config = config_from(&[
            ("DATABASE_URL", GOOD_DATABASE_URL),
            ("REDIS_URL", GOOD_REDIS_URL),
            ("WORKER_CONCURRENCY", ""),
        ])
        .unwrap();

        assert_eq!(config.concurrency, 1);
    }

    #[test]
    fn empty_environment_reports_both_urls() {
        let problems = config_from(&[]).unwrap_err();

        assert_eq!(
            problem_variables(&problems),
            vec!["DATABASE_URL", "REDIS_URL"]
        );
        assert!(problems[0].message.contains("is not set"));
        assert!(problems[0].message.contains("postgres://"));
        assert!(problems[1].message.contains("redis://"));
    }

    #[test]
    fn every_invalid_variable_is_reported() {
        let problems = config_from(&[
            ("DATABASE_URL", "mysql://u:dbsecret@db/app"),
            ("REDIS_URL", "redis://:redissecret@cache:6379/zero"),
            ("QUEUE_NAME", "bad queue"),
            ("WORKER_NAME", "worker@host"),
            ("WORKER_CONCURRENCY", "65"),
            ("WORKER_DRAIN_TIMEOUT_SECS", "-1"),
        ])
        .unwrap_err();

        assert_eq!(
            problem_variables(&problems),
            vec![
                "DATABASE_URL",
                "REDIS_URL",
                "QUEUE_NAME",
                "WORKER_NAME",
                "WORKER_CONCURRENCY",
                "WORKER_DRAIN_TIMEOUT_SECS",
            ]
        );
        for problem in &problems {
            let text = problem.to_string();
            assert!(!text.contains("dbsecret"), "password leaked: {text}");
            assert!(!text.contains("redissecret"), "password leaked: {text}");
        }
    }

    #[test]
    fn concurrency_zero_is_rejected() {
        let problems = config_from(&[
            ("DATABASE_URL", GOOD_DATABASE_URL),
            ("REDIS_URL", GOOD_REDIS_URL),
            ("WORKER_CONCURRENCY", "0"),
        ])
        .unwrap_err();

        assert_eq!(problem_variables(&problems), vec!["WORKER_CONCURRENCY"]);
        assert!(problems[0].message.contains("from 1 to 64"));
        assert!(problems[0].message.contains("\"0\""));
    }

    #[test]
    fn concurrency_bounds_are_accepted() {
        for value in ["1", "64"] {
            let config = config_from(&[
                ("DATABASE_URL", GOOD_DATABASE_URL),
                ("REDIS_URL", GOOD_REDIS_URL),
                ("WORKER_CONCURRENCY", value),
            ]);
            assert!(config.is_ok(), "WORKER_CONCURRENCY={value} rejected");
        }
    }

    #[test]
    fn database_url_without_database_name_is_rejected() {
        let problems = config_from(&[
            ("DATABASE_URL", "postgres://u:pw@127.0.0.1:5432"),
            ("REDIS_URL", GOOD_REDIS_URL),
        ])
        .unwrap_err();

        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.contains("no database name"));
        assert!(problems[0]
            .message
            .contains("postgres://u:***@127.0.0.1:5432"));
    }

    #[test]
    fn database_url_requiring_tls_is_rejected() {
        let problems = config_from(&[
            ("DATABASE_URL", "postgres://u:pw@db/app?sslmode=require"),
            ("REDIS_URL", GOOD_REDIS_URL),
        ])
        .unwrap_err();

        assert_eq!(problem_variables(&problems), vec!["DATABASE_URL"]);
        assert!(problems[0].message.contains("TLS"));
    }

    #[test]
    fn non_url_database_url_is_rejected() {
        let problems = config_from(&[
            ("DATABASE_URL", "host=db user=u"),
            ("REDIS_URL", GOOD_REDIS_URL),
        ])
        .unwrap_err();

        assert_eq!(problem_variables(&problems), vec!["DATABASE_URL"]);
        assert!(problems[0].message.contains("not a valid URL"));
    }

    #[test]
    fn redis_tls_url_is_rejected() {
        let problems = config_from(&[
            ("DATABASE_URL", GOOD_DATABASE_URL),
            ("REDIS_URL", "rediss://:pw@cache:6379/0"),
        ])
        .unwrap_err();

        assert_eq!(problem_variables(&problems), vec!["REDIS_URL"]);
        assert!(problems[0].message.contains("rediss://"));
    }

    #[test]
    fn missing_host_is_rejected() {
        let problems = config_from(&[
            ("DATABASE_URL", GOOD_DATABASE_URL),
            ("REDIS_URL", "redis:///0"),
        ])
        .unwrap_err();

        assert_eq!(problem_variables(&problems), vec!["REDIS_URL"]);
        assert!(problems[0].message.contains("no host"));
    }

    #[test]
    fn debug_output_hides_passwords() {
        let config = config_from(&[
            ("DATABASE_URL", GOOD_DATABASE_URL),
            ("REDIS_URL", GOOD_REDIS_URL),
        ])
        .unwrap();

        let shown = format!("{config:?}");
        assert!(!shown.contains("pgpass"));
        assert!(!shown.contains("redispass"));
    }

    #[test]
    fn smtp_url_is_parsed() {
        let config = config_from(&[
            ("DATABASE_URL", GOOD_DATABASE_URL),
            ("REDIS_URL", GOOD_REDIS_URL),
            ("SMTP_URL", "smtp://mailer:p%40ss@relay.internal:2525"),
            ("SMTP_FROM", "Yametee <shop@example.com>"),
        ])
        .unwrap();

        let smtp = config.smtp.clone().expect("SMTP relay set");
        assert_eq!(smtp.host, "relay.internal");
        assert_eq!(smtp.port, 2525);
        assert_eq!(
            smtp.credentials,
            Some(("mailer".to_string(), "p@ss".to_string()))
        );
        assert_eq!(
            config.smtp_from.as_deref(),
            Some("Yametee <shop@example.com>")
        );
        assert!(config.secrets().contains(&"p@ss".to_string()));
        assert!(!format!("{config:?}").contains("p%40ss"));
    }

    #[test]
    fn smtp_url_without_port_uses_25() {
        let config = config_from(&[
            ("DATABASE_URL", GOOD_DATABASE_URL),
            ("REDIS_URL", GOOD_REDIS_URL),
            ("SMTP_URL", "smtp://127.0.0.1"),
        ])
        .unwrap();

        let smtp = config.smtp.expect("SMTP relay set");
        assert_eq!(smtp.port, 25);
        assert_eq!(smtp.credentials, None);
    }

    #[test]
    fn invalid_smtp_settings_are_rejected() {
        let cases = [
            ("smtps://relay:465", "TLS"),
            ("http://relay", "scheme \"http\""),
            ("smtp://relay/mail?tls=required", "path or query"),
            ("smtp://user@relay", "without a password"),
        ];
        for (url, expected) in cases {
            let problems = config_from(&[
                ("DATABASE_URL", GOOD_DATABASE_URL),
                ("REDIS_URL", GOOD_REDIS_URL),
                ("SMTP_URL", url),
            ])
            .unwrap_err();
            assert_eq!(problem_variables(&problems), vec!["SMTP_URL"], "{url}");
            assert!(
                problems[0].message.contains(expected),
                "{url}: {}",
                problems[0].message
            );
        }

        let problems = config_from(&[
            ("DATABASE_URL", GOOD_DATABASE_URL),
            ("REDIS_URL", GOOD_REDIS_URL),
            ("SMTP_FROM", "not an address"),
        ])
        .unwrap_err();
        assert_eq!(problem_variables(&problems), vec!["SMTP_FROM"]);
    }

    #[test]
    fn secrets_lists_both_passwords() {
        let config = config_from(&[
            ("DATABASE_URL", GOOD_DATABASE_URL),
            ("REDIS_URL", GOOD_REDIS_URL),
        ])
        .unwrap();

        let secrets = config.secrets();
        assert!(secrets.contains(&"pgpass".to_string()));
        assert!(secrets.contains(&"redispass".to_string()));
    }
}
