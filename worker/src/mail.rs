//! Delivery of e-mail through the SMTP relay named by `SMTP_URL`.
//!
//! The connection is plain SMTP without TLS, meant for a relay on the same host or the
//! private network (a local Postfix, say), which then delivers onward.

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::SmtpRelay;
use crate::redact::redact_url;

/// Maximum time for one SMTP conversation, well below the job timeout so that a stalled
/// relay fails the attempt instead of the whole job timing out.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Reason a message was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailError {
    /// The relay or the network failed for now (a 4xx reply, a refused connection): a
    /// later attempt may succeed.
    #[error("{0}")]
    Transient(String),
    /// The relay rejected the message for good (a 5xx reply), or the message cannot be
    /// built from the job's data.
    #[error("{0}")]
    Permanent(String),
}

/// One message to send.
pub struct OutgoingEmail<'a> {
    pub to: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
    /// `Message-ID` header value without the angle brackets, the same on every attempt
    /// for one job so that mail clients can spot a duplicate.
    pub message_id: &'a str,
}

/// An SMTP client for one relay and sender address.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// The relay URL with its password hidden, for log lines.
    relay_shown: String,
}

impl Mailer {
    /// Creates a client for `relay` that sends as `from`. Nothing connects until the
    /// first message.
    pub fn new(relay: &SmtpRelay, from: &str) -> Result<Mailer, String> {
        let from: Mailbox = from
            .parse()
            .map_err(|error| format!("sender address {from:?} is invalid: {error}"))?;

        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&relay.host)
            .port(relay.port)
            .timeout(Some(SMTP_TIMEOUT));
        if let Some((user, password)) = &relay.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }

        Ok(Mailer {
            transport: builder.build(),
            from,
            relay_shown: redact_url(&relay.url),
        })
    }

    /// Returns the relay URL with its password hidden.
    pub fn relay(&self) -> &str {
        &self.relay_shown
    }

    /// Returns the domain of the sender address, for `Message-ID` values.
    pub fn sender_domain(&self) -> &str {
        self.from.email.domain()
    }

    /// Sends one plain text message and returns once the relay accepted it.
    pub async fn send(&self, email: &OutgoingEmail<'_>) -> Result<(), MailError> {
        let to: Mailbox = email.to.parse().map_err(|error| {
            MailError::Permanent(format!("recipient {:?} is invalid: {error}", email.to))
        })?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(email.subject)
            .message_id(Some(format!("<{}>", email.message_id)))
            .header(ContentType::TEXT_PLAIN)
            .body(email.body.to_string())
            .map_err(|error| {
                MailError::Permanent(format!("building the message failed: {error}"))
            })?;

        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(error) if error.is_permanent() => Err(MailError::Permanent(format!(
                "SMTP relay {} rejected the message: {}",
                self.relay_shown,
                crate::error_chain(&error)
            ))),
            Err(error) => Err(MailError::Transient(format!(
                "sending through SMTP relay {} failed: {}",
                self.relay_shown,
                crate::error_chain(&error)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay() -> SmtpRelay {
        SmtpRelay {
            url: "smtp://mailer:secret@127.0.0.1:2525".to_string(),
            host: "127.0.0.1".to_string(),
            port: 2525,
            credentials: Some(("mailer".to_string(), "secret".to_string())),
        }
    }

    #[test]
    fn mailer_hides_relay_password() {
        let mailer = Mailer::new(&relay(), "shop@example.com").unwrap();
        assert_eq!(mailer.relay(), "smtp://mailer:***@127.0.0.1:2525");
        assert_eq!(mailer.sender_domain(), "example.com");
    }

    #[test]
    fn mailer_rejects_invalid_sender() {
        let error = Mailer::new(&relay(), "no sender").err().expect("rejected");
        assert!(
            error.contains("sender address \"no sender\" is invalid"),
            "{error}"
        );
    }
}
