//! Secret values: resolved from the environment or a file at run time, and redacted from every
//! piece of text the tool shows.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::inventory::{Inventory, SecretRef};

/// Resolved secret values, keyed by the inventory setting that refers to them.
#[derive(Clone, Default)]
pub struct Secrets {
    values: BTreeMap<String, String>,
    /// Shown in place of a secret: `<secret:app.database.password>`.
    placeholders: BTreeMap<String, String>,
    /// Whether the values are the placeholders themselves (rendering for review).
    placeholder_mode: bool,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("keys", &self.values.keys())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("missing secret{} for {}: environment variable{} {} not set",
        if missing.len() == 1 { "" } else { "s" },
        missing.iter().map(|(setting, _)| setting.as_str()).collect::<Vec<_>>().join(", "),
        if missing.len() == 1 { "" } else { "s" },
        missing.iter().map(|(_, name)| name.as_str()).collect::<Vec<_>>().join(", ")
            + if missing.len() == 1 { " is" } else { " are" })]
    MissingEnv {
        /// Each setting whose variable is unset, with the variable's name.
        missing: Vec<(String, String)>,
    },
    #[error("cannot read the secret for {setting} from {}", path.display())]
    ReadFile {
        setting: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("empty secret for {setting} from {source_ref}")]
    Empty { setting: String, source_ref: String },
}

impl Secrets {
    /// Resolves every secret of the inventory. `fallback` supplies values for `{env: NAME}`
    /// references whose variable is unset (the lab keeps generated passwords there).
    pub fn resolve(
        inventory: &Inventory,
        fallback: &BTreeMap<String, String>,
    ) -> Result<Secrets, SecretError> {
        Secrets::resolve_only(inventory, fallback, None)
    }

    /// Like [`Secrets::resolve`], reading only the settings in `needed` when given: a command
    /// that talks to Redis alone should not need the database password.
    pub fn resolve_only(
        inventory: &Inventory,
        fallback: &BTreeMap<String, String>,
        needed: Option<&[&str]>,
    ) -> Result<Secrets, SecretError> {
        let mut secrets = Secrets::default();
        // Every unset variable is named at once, not one per run.
        let mut missing = Vec::new();
        for (setting, reference) in inventory.secret_refs() {
            if needed.is_some_and(|needed| !needed.contains(&setting)) {
                continue;
            }
            let value = match reference {
                SecretRef::Env(name) => match std::env::var(name) {
                    Ok(value) => value,
                    Err(_) => match fallback.get(name) {
                        Some(value) => value.clone(),
                        None => {
                            missing.push((setting.to_string(), name.clone()));
                            continue;
                        }
                    },
                },
                SecretRef::File(path) => std::fs::read_to_string(path)
                    .map_err(|source| SecretError::ReadFile {
                        setting: setting.to_string(),
                        path: path.clone(),
                        source,
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            };
            if value.is_empty() {
                return Err(SecretError::Empty {
                    setting: setting.to_string(),
                    source_ref: reference.to_string(),
                });
            }
            secrets.insert(setting, value);
        }
        if !missing.is_empty() {
            return Err(SecretError::MissingEnv { missing });
        }
        Ok(secrets)
    }

    /// Stands placeholders in for every secret, for rendering without access to the values.
    pub fn placeholders(inventory: &Inventory) -> Secrets {
        let mut secrets = Secrets {
            placeholder_mode: true,
            ..Secrets::default()
        };
        for setting in inventory.secret_refs().keys() {
            let placeholder = placeholder(setting);
            secrets.insert(setting, placeholder);
        }
        secrets
    }

    /// Secrets with the given values, for tests of code that redacts.
    #[cfg(test)]
    pub fn for_tests(pairs: &[(&str, &str)]) -> Secrets {
        let mut secrets = Secrets::default();
        for (setting, value) in pairs {
            secrets.insert(setting, value.to_string());
        }
        secrets
    }

    fn insert(&mut self, setting: &str, value: String) {
        self.placeholders
            .insert(setting.to_string(), placeholder(setting));
        self.values.insert(setting.to_string(), value);
    }

    /// The value of a secret setting such as `app.redis.password`.
    pub fn get(&self, setting: &str) -> &str {
        self.values
            .get(setting)
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// The value of a secret setting, percent-encoded for the user-info part of a URL.
    /// Placeholders stay readable.
    pub fn url_component(&self, setting: &str) -> String {
        if self.placeholder_mode {
            return self.get(setting).to_string();
        }
        percent_encode(self.get(setting))
    }

    /// Replaces every secret value in `text` with its placeholder.
    pub fn redact(&self, text: &str) -> String {
        let mut redacted = text.to_string();
        // Longer values first, so a secret that contains another is replaced whole.
        let mut pairs: Vec<(&String, &String)> = self.values.iter().collect();
        pairs.sort_by_key(|(_, value)| std::cmp::Reverse(value.len()));
        for (setting, value) in pairs {
            if value.is_empty() || *value == self.placeholders[setting] {
                continue;
            }
            redacted = redacted.replace(value.as_str(), &self.placeholders[setting]);
            let encoded = percent_encode(value);
            if encoded != *value {
                redacted = redacted.replace(&encoded, &self.placeholders[setting]);
            }
        }
        redacted
    }
}

/// Hides values that look like secrets but are not the current ones, such as a rotated
/// password still in a host's old file: the argument of `requirepass` and `masterauth`, the
/// password in a URL's user info, and the value of an `..._PASSWORD=` variable. Placeholders
/// are kept, so a diff still shows which secret a line carries.
pub fn mask_secret_like(text: &str) -> String {
    let mut masked = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, newline) = match line.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (line, ""),
        };
        masked.push_str(&mask_line(body));
        masked.push_str(newline);
    }
    masked
}

const MASK: &str = "<redacted>";

fn is_placeholder(value: &str) -> bool {
    value.starts_with("<secret:") || value == MASK
}

fn mask_line(line: &str) -> String {
    let trimmed = line.trim_start();
    let indent = &line[..line.len() - trimmed.len()];
    for directive in ["requirepass ", "masterauth "] {
        if let Some(value) = trimmed.strip_prefix(directive) {
            if !is_placeholder(value.trim()) {
                return format!("{indent}{directive}{MASK}");
            }
        }
    }
    if let Some((name, value)) = trimmed.split_once('=') {
        if name.ends_with("PASSWORD") && !value.is_empty() && !is_placeholder(value) {
            return format!("{indent}{name}={MASK}");
        }
    }
    mask_url_passwords(line)
}

/// Replaces the password of every `scheme://user:password@` in `line`.
fn mask_url_passwords(line: &str) -> String {
    let mut result = String::new();
    let mut rest = line;
    while let Some(start) = rest.find("://") {
        let (before, after) = rest.split_at(start + 3);
        result.push_str(before);
        let authority_end = after.find(['/', ' ', '"', '\'']).unwrap_or(after.len());
        let authority = &after[..authority_end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at && !is_placeholder(&authority[colon + 1..at]) => {
                result.push_str(&authority[..colon + 1]);
                result.push_str(MASK);
                result.push_str(&authority[at..]);
            }
            _ => result.push_str(authority),
        }
        rest = &after[authority_end..];
    }
    result.push_str(rest);
    result
}

fn placeholder(setting: &str) -> String {
    format!("<secret:{setting}>")
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for passwords in URLs.
pub fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_replaces_plain_and_encoded_values() {
        let secrets = Secrets::for_tests(&[("app.redis.password", "p@ss word")]);
        let text = "requirepass p@ss word\nREDIS_URL=redis://:p%40ss%20word@10.0.0.1:6379/0";
        let redacted = secrets.redact(text);
        assert_eq!(
            redacted,
            "requirepass <secret:app.redis.password>\n\
             REDIS_URL=redis://:<secret:app.redis.password>@10.0.0.1:6379/0"
        );
    }

    #[test]
    fn redact_prefers_longer_secret() {
        let secrets = Secrets::for_tests(&[("a", "abc"), ("b", "abcdef")]);
        assert_eq!(secrets.redact("x abcdef abc"), "x <secret:b> <secret:a>");
    }

    #[test]
    fn mask_hides_unknown_secret_values() {
        let text = "requirepass OldPw42\nrequirepass <secret:app.redis.password>\n\
                    REDIS_URL=redis://:OldPw42@10.0.0.1:6379/0\n\
                    DATABASE_URL=postgres://app:<secret:app.database.password>@db:5432/app\n\
                    PGPASSWORD=hunter2\nport 6379";
        assert_eq!(
            mask_secret_like(text),
            "requirepass <redacted>\nrequirepass <secret:app.redis.password>\n\
             REDIS_URL=redis://:<redacted>@10.0.0.1:6379/0\n\
             DATABASE_URL=postgres://app:<secret:app.database.password>@db:5432/app\n\
             PGPASSWORD=<redacted>\nport 6379"
        );
    }

    #[test]
    fn mask_leaves_urls_without_password() {
        let line = "see https://example.org/a:b@c and redis://10.0.0.1:6379/0";
        assert_eq!(mask_secret_like(line), line);
    }

    #[test]
    fn percent_encode_keeps_unreserved() {
        assert_eq!(percent_encode("Az09-._~"), "Az09-._~");
        assert_eq!(percent_encode("a/b:c@d"), "a%2Fb%3Ac%40d");
    }
}
