//! Removal of passwords from connection URLs and error text before they are logged.
//!
//! The worker's URLs carry the PostgreSQL and Redis passwords, and client libraries
//! sometimes echo parts of a URL in their errors, so every message that names a URL or
//! wraps a client error goes through this module first.

/// Text that replaces a password.
pub const REDACTED: &str = "***";

/// Replaces the password in a connection URL with `***`.
///
/// Handles `scheme://user:password@host/...` and a `password=` query parameter. Input
/// that is not a valid URL gets the same treatment, which may hide more than the
/// password: everything between the first ':' of the user information and the last '@'.
pub fn redact_url(url: &str) -> String {
    // Without "://" (a typo such as "postgres:/u:p@h") the user information may start at
    // the beginning, so the scan covers the whole text.
    let authority_start = url.find("://").map_or(0, |scheme_end| scheme_end + 3);
    let rest = &url[authority_start..];

    // The last '@' ends the user information even when an unencoded '@' sits inside the
    // password.
    let redacted_rest = match rest.rfind('@') {
        Some(at) => {
            let user_info = &rest[..at];
            match user_info.find(':') {
                Some(colon) => format!("{}:{REDACTED}{}", &user_info[..colon], &rest[at..]),
                None => rest.to_string(),
            }
        }
        None => rest.to_string(),
    };

    redact_password_parameter(&format!("{}{}", &url[..authority_start], redacted_rest))
}

/// Hides the value of a `password=` query parameter, as libpq-style URLs allow one.
fn redact_password_parameter(url: &str) -> String {
    let Some(query_start) = url.find('?') else {
        return url.to_string();
    };

    let parameters: Vec<String> = url[query_start + 1..]
        .split('&')
        .map(|parameter| match parameter.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                format!("{name}={REDACTED}")
            }
            _ => parameter.to_string(),
        })
        .collect();

    format!("{}?{}", &url[..query_start], parameters.join("&"))
}

/// Replaces every occurrence of each non-empty secret in `text` with `***`.
///
/// Used on error messages from the database and Redis clients, whose wording this
/// crate does not control.
pub fn scrub_secrets(text: &str, secrets: &[String]) -> String {
    let mut scrubbed = text.to_string();
    for secret in secrets.iter().filter(|secret| !secret.is_empty()) {
        scrubbed = scrubbed.replace(secret.as_str(), REDACTED);
    }
    scrubbed
}

/// Returns the password of a URL in both its written and its percent-decoded form, so
/// that [`scrub_secrets`] catches either spelling in a message.
pub fn url_passwords(url: &str) -> Vec<String> {
    let mut passwords = Vec::new();

    if let Ok(parsed) = url::Url::parse(url) {
        if let Some(password) = parsed.password() {
            passwords.push(password.to_string());
            passwords.push(percent_decode(password));
        }
        for (name, value) in parsed.query_pairs() {
            if name.eq_ignore_ascii_case("password") {
                passwords.push(value.into_owned());
            }
        }
    }

    passwords.retain(|password| !password.is_empty());
    passwords.sort();
    passwords.dedup();
    passwords
}

/// Decodes `%XX` escapes, leaving a malformed escape as it is.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;

    while index < bytes.len() {
        let escape = bytes.get(index + 1..index + 3).and_then(|hex| {
            std::str::from_utf8(hex)
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        });
        match (bytes[index], escape) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                index += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                index += 1;
            }
        }
    }

    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_postgres_password() {
        assert_eq!(
            redact_url("postgres://yametee_user:s3cret@192.0.2.1:5432/yame_tee"),
            "postgres://yametee_user:***@192.0.2.1:5432/yame_tee"
        );
    }

    #[test]
    fn redact_url_hides_redis_password_without_user() {
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
    }

    #[test]
    fn redact_url_keeps_url_without_password() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("postgres://user@db/app"),
            "postgres://user@db/app"
        );
    }

    #[test]
    fn redact_url_hides_password_containing_at_sign() {
        let redacted = redact_url("postgres://user:p@ss/word@db:5432/app");
        assert_eq!(redacted, "postgres://user:***@db:5432/app");
        assert!(!redacted.contains("ss/word"));
    }

    #[test]
    fn redact_url_hides_password_query_parameter() {
        assert_eq!(
            redact_url("postgres://db/app?user=u&password=s3cret&sslmode=disable"),
            "postgres://db/app?user=u&password=***&sslmode=disable"
        );
    }

    #[test]
    fn redact_url_keeps_plain_text() {
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url(""), "");
    }

    #[test]
    fn redact_url_hides_password_in_malformed_url() {
        let redacted = redact_url("postgres:/user:s3cret@db/app");
        assert!(!redacted.contains("s3cret"), "{redacted}");
        assert_eq!(redacted, "postgres:***@db/app");
    }

    #[test]
    fn scrub_secrets_replaces_every_occurrence() {
        let secrets = vec!["pw1".to_string(), String::new()];
        assert_eq!(
            scrub_secrets("auth pw1 failed (pw1)", &secrets),
            "auth *** failed (***)"
        );
    }

    #[test]
    fn url_passwords_returns_encoded_and_decoded_forms() {
        let passwords = url_passwords("redis://:a%40b@127.0.0.1:6379/0");
        assert!(passwords.contains(&"a%40b".to_string()));
        assert!(passwords.contains(&"a@b".to_string()));
    }

    #[test]
    fn url_passwords_includes_query_password() {
        let passwords = url_passwords("postgres://db/app?password=q1");
        assert_eq!(passwords, vec!["q1".to_string()]);
    }
}
