//! The yametee background worker: takes JSON jobs from a Redis list and processes them
//! against PostgreSQL and Redis.
//!
//! `main` reads the [`config::Config`] and hands it to [`worker::run`], which connects,
//! applies the schema migrations, and runs the fetch loop until SIGTERM or SIGINT.
//! Each fetched job runs in [`execute`] on one of the [`slots`], and [`ack`] removes
//! finished jobs from the in-flight list in batches.

pub mod ack;
pub mod config;
pub mod db;
pub mod execute;
pub mod handlers;
pub mod job;
pub mod keys;
pub mod logging;
pub mod mail;
pub mod maintenance;
pub mod queue;
pub mod redact;
pub mod retry;
pub mod slots;
pub mod startup;
pub mod worker;

/// Formats an error and its sources on one line, joined by ": ", with line breaks in
/// server messages (PostgreSQL's DETAIL and HINT) turned into "; ".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some error types repeat their source's text in their own message.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace("\r\n", "; ").replace('\n', "; ")
}

/// Returns the current time as RFC 3339 in UTC with milliseconds, the format of the web
/// platform's `createdAt` (`2025-01-01T00:00:00.000Z`).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Returns the current time in milliseconds since the Unix epoch.
pub fn unix_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Returns the current time in microseconds since the Unix epoch.
pub fn unix_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connecting failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_joins_sources() {
        let error = Outer(std::io::Error::other("refused\nDETAIL: port closed"));
        assert_eq!(
            error_chain(&error),
            "connecting failed: refused; DETAIL: port closed"
        );
    }

    #[test]
    fn now_rfc3339_has_milliseconds_and_zulu() {
        let now = now_rfc3339();
        assert_eq!(now.len(), "2025-01-01T00:00:00.000Z".len());
        assert!(now.ends_with('Z'));
    }
}
