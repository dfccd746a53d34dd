//! A minimal SMTP server on 127.0.0.1 in the role of the mail relay.
//!
//! It speaks just enough of RFC 5321 for one client at a time (EHLO, MAIL, RCPT, DATA,
//! RSET, NOOP, QUIT) and keeps every accepted message. A recipient whose address starts
//! with `reject` gets a permanent 550 reply, and one starting with `tempfail` a 451.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A message the server accepted.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    pub from: String,
    pub to: Vec<String>,
    /// Headers and body as sent after DATA, with the dot stuffing undone.
    pub data: String,
}

pub struct SmtpServer {
    pub port: u16,
    messages: Arc<Mutex<Vec<ReceivedMail>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpServer {
    /// Starts listening on a free port of 127.0.0.1, on the current tokio runtime.
    pub async fn start() -> SmtpServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the SMTP test server");
        let port = listener.local_addr().expect("reading the SMTP port").port();
        let messages = Arc::new(Mutex::new(Vec::new()));

        let stored = Arc::clone(&messages);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, Arc::clone(&stored)));
            }
        });
        SmtpServer {
            port,
            messages,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn messages(&self) -> Vec<ReceivedMail> {
        self.messages.lock().unwrap().clone()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: TcpStream, messages: Arc<Mutex<Vec<ReceivedMail>>>) {
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    let mut from = String::new();
    let mut to = Vec::new();

    if writer.write_all(b"220 test-relay ESMTP\r\n").await.is_err() {
        return;
    }
    while let Ok(Some(line)) = lines.next_line().await {
        let upper = line.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            "250 test-relay\r\n".into()
        } else if upper.starts_with("MAIL FROM:") {
            from = address_of(&line);
            to.clear();
            "250 sender ok\r\n".into()
        } else if upper.starts_with("RCPT TO:") {
            let recipient = address_of(&line);
            if recipient.starts_with("reject") {
                "550 mailbox unavailable\r\n".into()
            } else if recipient.starts_with("tempfail") {
                "451 try again later\r\n".into()
            } else {
                to.push(recipient);
                "250 recipient ok\r\n".into()
            }
        } else if upper == "DATA" {
            if writer
                .write_all(b"354 end with <CRLF>.<CRLF>\r\n")
                .await
                .is_err()
            {
                return;
            }
            let mut data = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                if line == "." {
                    break;
                }
                data.push_str(line.strip_prefix('.').unwrap_or(&line));
                data.push('\n');
            }
            messages.lock().unwrap().push(ReceivedMail {
                from: from.clone(),
                to: std::mem::take(&mut to),
                data,
            });
            "250 queued\r\n".into()
        } else if upper == "RSET" || upper == "NOOP" {
            "250 ok\r\n".into()
        } else if upper == "QUIT" {
            let _ = writer.write_all(b"221 bye\r\n").await;
            return;
        } else {
            "500 command not recognised\r\n".into()
        };
        if writer.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Returns the address between the angle brackets of a MAIL or RCPT command.
fn address_of(line: &str) -> String {
    let start = line.find('<').map_or(0, |index| index + 1);
    let end = line[start..]
        .find('>')
        .map_or(line.len(), |index| start + index);
    line[start..end].to_string()
}
