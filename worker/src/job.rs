//! Parsing of queued jobs into typed requests.
//!
//! A job is the JSON document producers push: `{"id", "type", "data", "createdAt"}`,
//! plus the `attempts` and `lastError` fields the worker adds when it schedules a retry.
//! Anything that cannot become a [`Job`] is a [`Rejection`]: retrying would fail the same
//! way, so the job goes to the dead letter list at once.

use serde_json::{Map, Value};

pub const ORDER_PROCESS: &str = "order:process";
pub const EMAIL_SEND: &str = "email:send";
pub const WEBHOOK_PROCESS: &str = "webhook:process";
pub const CACHE_WARM: &str = "cache:warm";
pub const VERIFY_PROBE: &str = "verify:probe";

/// Job types this worker processes.
pub const JOB_TYPES: [&str; 5] = [
    ORDER_PROCESS,
    EMAIL_SEND,
    WEBHOOK_PROCESS,
    CACHE_WARM,
    VERIFY_PROBE,
];

/// Longest accepted job id. The id becomes part of Redis keys and a primary key.
pub const MAX_JOB_ID_LEN: usize = 200;
/// Longest accepted e-mail address, the limit of RFC 5321's forward path.
pub const MAX_EMAIL_ADDRESS_LEN: usize = 254;
/// Longest accepted e-mail subject, the line length limit of RFC 5322.
pub const MAX_EMAIL_SUBJECT_LEN: usize = 998;
/// Largest accepted e-mail body, in bytes.
pub const MAX_EMAIL_BODY_BYTES: usize = 1_000_000;

/// A job that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    pub request: JobRequest,
    /// Number of earlier attempts that failed; 0 for a job fresh from a producer.
    pub attempts: u32,
    /// The job document as received, kept so that a retry carries every field onward.
    pub document: Map<String, Value>,
}

/// The work a job requests, with its validated data.
#[derive(Debug, Clone, PartialEq)]
pub enum JobRequest {
    OrderProcess { order_id: String },
    EmailSend(Email),
    WebhookProcess(Webhook),
    CacheWarm { entries: Vec<CacheEntry> },
    VerifyProbe,
}

impl JobRequest {
    /// Returns the job type as producers write it.
    pub fn job_type(&self) -> &'static str {
        match self {
            JobRequest::OrderProcess { .. } => ORDER_PROCESS,
            JobRequest::EmailSend(_) => EMAIL_SEND,
            JobRequest::WebhookProcess(_) => WEBHOOK_PROCESS,
            JobRequest::CacheWarm { .. } => CACHE_WARM,
            JobRequest::VerifyProbe => VERIFY_PROBE,
        }
    }
}

/// An e-mail message to put in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    pub to: String,
    pub subject: String,
    pub body: String,
}

/// A webhook event to apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Webhook {
    /// An event the web platform stored in `webhook_events`, named by `data.eventId`.
    Stored { event_id: i64 },
    /// An event carried in the job's data, stored by the worker before it is applied.
    Inline {
        /// Sender, from the optional `source` field.
        source: Option<String>,
        /// Event name, from the optional `event` field (or `type` when `event` is absent).
        event: Option<String>,
        /// The whole `data` object.
        payload: Map<String, Value>,
    },
}

/// Cache entries a `cache:warm` job can compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheEntry {
    /// Number of orders in each status.
    OrderStatusCounts,
    /// Order totals: all orders, processed orders, latest processing time.
    OrderSummary,
}

impl CacheEntry {
    pub const ALL: [CacheEntry; 2] = [CacheEntry::OrderStatusCounts, CacheEntry::OrderSummary];

    /// Returns the name used in a job's `keys` list and in the Redis key.
    pub fn name(self) -> &'static str {
        match self {
            CacheEntry::OrderStatusCounts => "orders:status_counts",
            CacheEntry::OrderSummary => "orders:summary",
        }
    }

    fn from_name(name: &str) -> Option<CacheEntry> {
        CacheEntry::ALL
            .into_iter()
            .find(|entry| entry.name() == name)
    }
}

/// A job that cannot be processed, with the reason stored in the dead letter list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The job's id, when the document had a usable one.
    pub job_id: Option<String>,
    /// The job's type, when the document had one.
    pub job_type: Option<String>,
    pub reason: String,
}

/// Parses and validates one job document as popped from the queue.
pub fn parse_job(raw: &str) -> Result<Job, Rejection> {
    let reject = |job_id: Option<&str>, job_type: Option<&str>, reason: String| Rejection {
        job_id: job_id.map(str::to_string),
        job_type: job_type.map(str::to_string),
        reason,
    };

    let document = match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(document)) => document,
        Ok(_) => return Err(reject(None, None, "job is not a JSON object".to_string())),
        Err(error) => {
            return Err(reject(
                None,
                None,
                format!("job is not valid JSON: {error}"),
            ))
        }
    };

    let id = match document.get("id") {
        Some(Value::String(id)) if !id.trim().is_empty() && id.len() <= MAX_JOB_ID_LEN => {
            id.clone()
        }
        Some(Value::String(id)) if id.len() > MAX_JOB_ID_LEN => {
            return Err(reject(
                None,
                None,
                format!("job id is longer than {MAX_JOB_ID_LEN} bytes"),
            ));
        }
        Some(Value::String(_)) => return Err(reject(None, None, "job id is empty".to_string())),
        Some(Value::Number(number)) => number.to_string(),
        Some(_) => return Err(reject(None, None, "job id is not a string".to_string())),
        None => return Err(reject(None, None, "job has no \"id\" field".to_string())),
    };

    let job_type = match document.get("type") {
        Some(Value::String(job_type)) => job_type.as_str(),
        Some(_) => {
            return Err(reject(
                Some(&id),
                None,
                "job type is not a string".to_string(),
            ))
        }
        None => {
            return Err(reject(
                Some(&id),
                None,
                "job has no \"type\" field".to_string(),
            ))
        }
    };

    let empty = Map::new();
    let data = match document.get("data") {
        Some(Value::Object(data)) => data,
        None | Some(Value::Null) => &empty,
        Some(_) => {
            return Err(reject(
                Some(&id),
                Some(job_type),
                "job data is not a JSON object".to_string(),
            ))
        }
    };

    let request = match job_type {
        ORDER_PROCESS => parse_order(data),
        EMAIL_SEND => parse_email(data).map(JobRequest::EmailSend),
        WEBHOOK_PROCESS => parse_webhook(data).map(JobRequest::WebhookProcess),
        CACHE_WARM => parse_cache_warm(data),
        VERIFY_PROBE => Ok(JobRequest::VerifyProbe),
        unknown => Err(format!(
            "unknown job type {unknown:?}: expected one of {}",
            JOB_TYPES.join(", ")
        )),
    }
    .map_err(|reason| reject(Some(&id), Some(job_type), reason))?;

    // A missing or malformed counter reads as 0, so the job gets every attempt.
    let attempts = document
        .get("attempts")
        .and_then(Value::as_u64)
        .map_or(0, |attempts| u32::try_from(attempts).unwrap_or(u32::MAX));

    Ok(Job {
        id,
        request,
        attempts,
        document,
    })
}

fn parse_order(data: &Map<String, Value>) -> Result<JobRequest, String> {
    let order_id = match data.get("orderId") {
        Some(Value::String(order_id)) if !order_id.trim().is_empty() => order_id.clone(),
        Some(Value::Number(order_id)) => order_id.to_string(),
        Some(_) => return Err("data.orderId is not a non-empty string".to_string()),
        None => return Err("data.orderId is missing".to_string()),
    };
    Ok(JobRequest::OrderProcess { order_id })
}

fn parse_email(data: &Map<String, Value>) -> Result<Email, String> {
    let field = |name: &str| match data.get(name) {
        Some(Value::String(value)) => Ok(value.clone()),
        Some(_) => Err(format!("data.{name} is not a string")),
        None => Err(format!("data.{name} is missing")),
    };

    let to = field("to")?.trim().to_string();
    let subject = field("subject")?;
    let body = field("body")?;

    check_email_address(&to)?;
    if subject.trim().is_empty() {
        return Err("data.subject is empty".to_string());
    }
    // A line break in a header would let the sender inject extra headers.
    if subject.contains(['\r', '\n']) {
        return Err("data.subject contains a line break".to_string());
    }
    if subject.chars().count() > MAX_EMAIL_SUBJECT_LEN {
        return Err(format!(
            "data.subject is longer than {MAX_EMAIL_SUBJECT_LEN} characters"
        ));
    }
    if body.len() > MAX_EMAIL_BODY_BYTES {
        return Err(format!(
            "data.body is larger than {MAX_EMAIL_BODY_BYTES} bytes"
        ));
    }

    Ok(Email { to, subject, body })
}

/// Checks the shape of an address (one '@', a local part, a dotted domain, no spaces or
/// header punctuation). Whether the mailbox exists is only known once a relay tries it.
fn check_email_address(address: &str) -> Result<(), String> {
    let invalid = |why: &str| {
        Err(format!(
            "data.to {address:?} is not a valid e-mail address: {why}"
        ))
    };

    if address.len() > MAX_EMAIL_ADDRESS_LEN {
        return invalid("too long");
    }
    if address
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';' | '"'))
    {
        return invalid("contains spaces, control characters or <>,;\"");
    }
    let Some((local, domain)) = address.split_once('@') else {
        return invalid("no '@'");
    };
    if local.is_empty() || domain.contains('@') {
        return invalid("expected exactly one '@' after a local part");
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 || labels.iter().any(|label| label.is_empty()) {
        return invalid("expected a domain such as example.com");
    }
    Ok(())
}

fn parse_webhook(data: &Map<String, Value>) -> Result<Webhook, String> {
    let text = |name: &str| data.get(name).and_then(Value::as_str).map(str::to_string);

    let event_id = match data.get("eventId") {
        None | Some(Value::Null) => {
            return Ok(Webhook::Inline {
                source: text("source"),
                event: text("event").or_else(|| text("type")),
                payload: data.clone(),
            })
        }
        Some(Value::Number(number)) => number.as_i64(),
        Some(Value::String(text)) => text.trim().parse::<i64>().ok(),
        Some(_) => None,
    };
    match event_id {
        Some(event_id) if event_id > 0 => Ok(Webhook::Stored { event_id }),
        _ => Err("data.eventId is not a positive whole number".to_string()),
    }
}

fn parse_cache_warm(data: &Map<String, Value>) -> Result<JobRequest, String> {
    let names = match data.get("keys") {
        None | Some(Value::Null) => {
            return Ok(JobRequest::CacheWarm {
                entries: CacheEntry::ALL.to_vec(),
            })
        }
        Some(Value::Array(names)) => names,
        Some(_) => return Err("data.keys is not a list of cache names".to_string()),
    };

    let known = || {
        CacheEntry::ALL
            .iter()
            .map(|entry| entry.name())
            .collect::<Vec<_>>()
            .join(", ")
    };

    let mut entries = Vec::new();
    for name in names {
        let Some(name) = name.as_str() else {
            return Err("data.keys is not a list of cache names".to_string());
        };
        let Some(entry) = CacheEntry::from_name(name) else {
            return Err(format!(
                "unknown cache name {name:?} in data.keys: expected {}",
                known()
            ));
        };
        if !entries.contains(&entry) {
            entries.push(entry);
        }
    }

    if entries.is_empty() {
        return Err(format!(
            "data.keys is empty: list cache names from {} or omit it",
            known()
        ));
    }
    Ok(JobRequest::CacheWarm { entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Job {
        parse_job(raw).unwrap_or_else(|rejection| panic!("rejected {raw}: {}", rejection.reason))
    }

    fn reject(raw: &str) -> Rejection {
        match parse_job(raw) {
            Ok(job) => panic!("accepted {raw}: {job:?}"),
            Err(rejection) => rejection,
        }
    }

    #[test]
    fn order_job_from_producer_is_parsed() {
        let job = parse(
            r#"{"id":"test-123","type":"order:process","data":{"orderId":"test-order-123"},"createdAt":"2025-01-01T00:00:00.000Z"}"#,
        );

        assert_eq!(job.id, "test-123");
        assert_eq!(job.attempts, 0);
        assert_eq!(
            job.request,
            JobRequest::OrderProcess {
                order_id: "test-order-123".to_string()
            }
        );
        assert_eq!(job.request.job_type(), "order:process");
        assert_eq!(job.document["createdAt"], "2025-01-01T00:00:00.000Z");
    }

    #[test]
    fn numeric_ids_are_read_as_text() {
        let job = parse(r#"{"id":42,"type":"order:process","data":{"orderId":7}}"#);

        assert_eq!(job.id, "42");
        assert_eq!(
            job.request,
            JobRequest::OrderProcess {
                order_id: "7".to_string()
            }
        );
    }

    #[test]
    fn email_job_is_parsed() {
        let job = parse(
            r#"{"id":"integration-test","type":"email:send","data":{"to":"test@example.com","subject":"Test","body":"Test email"}}"#,
        );

        assert_eq!(
            job.request,
            JobRequest::EmailSend(Email {
                to: "test@example.com".to_string(),
                subject: "Test".to_string(),
                body: "Test email".to_string(),
            })
        );
    }

    #[test]
    fn invalid_email_fields_are_rejected() {
        let cases = [
            (r#"{"subject":"s","body":"b"}"#, "data.to is missing"),
            (r#"{"to":"nobody","subject":"s","body":"b"}"#, "no '@'"),
            (
                r#"{"to":"a@b@example.com","subject":"s","body":"b"}"#,
                "exactly one '@'",
            ),
            (r#"{"to":"a@localhost","subject":"s","body":"b"}"#, "domain"),
            (
                r#"{"to":"a b@example.com","subject":"s","body":"b"}"#,
                "spaces",
            ),
            (
                r#"{"to":"a@example.com","subject":"","body":"b"}"#,
                "subject is empty",
            ),
            (
                r#"{"to":"a@example.com","subject":"x\r\nBcc: c@d.e","body":"b"}"#,
                "line break",
            ),
            (
                r#"{"to":"a@example.com","subject":"s","body":5}"#,
                "data.body is not a string",
            ),
        ];

        for (data, expected) in cases {
            let rejection = reject(&format!(
                r#"{{"id":"e1","type":"email:send","data":{data}}}"#
            ));
            assert!(
                rejection.reason.contains(expected),
                "data {data}: reason {:?} does not mention {expected:?}",
                rejection.reason
            );
            assert_eq!(rejection.job_id.as_deref(), Some("e1"));
        }
    }

    #[test]
    fn webhook_job_keeps_payload_and_names() {
        let job = parse(
            r#"{"id":"w1","type":"webhook:process","data":{"source":"stripe","type":"payment.succeeded","amount":1200}}"#,
        );

        let JobRequest::WebhookProcess(Webhook::Inline {
            source,
            event,
            payload,
        }) = job.request
        else {
            panic!("not an inline webhook: {:?}", job.request);
        };
        assert_eq!(source.as_deref(), Some("stripe"));
        assert_eq!(event.as_deref(), Some("payment.succeeded"));
        assert_eq!(payload["amount"], 1200);
    }

    #[test]
    fn webhook_job_names_stored_event() {
        for data in [r#"{"eventId":42}"#, r#"{"eventId":"42"}"#] {
            let job = parse(&format!(
                r#"{{"id":"w1","type":"webhook:process","data":{data}}}"#
            ));
            assert_eq!(
                job.request,
                JobRequest::WebhookProcess(Webhook::Stored { event_id: 42 }),
                "{data}"
            );
        }
    }

    #[test]
    fn webhook_job_with_invalid_event_id_is_rejected() {
        for data in [
            r#"{"eventId":0}"#,
            r#"{"eventId":"x"}"#,
            r#"{"eventId":[1]}"#,
        ] {
            let rejection = reject(&format!(
                r#"{{"id":"w1","type":"webhook:process","data":{data}}}"#
            ));
            assert!(
                rejection.reason.contains("data.eventId"),
                "{data}: {}",
                rejection.reason
            );
        }
    }

    #[test]
    fn cache_warm_without_keys_warms_every_entry() {
        let job = parse(r#"{"id":"c1","type":"cache:warm","data":{}}"#);
        assert_eq!(
            job.request,
            JobRequest::CacheWarm {
                entries: CacheEntry::ALL.to_vec()
            }
        );
    }

    #[test]
    fn cache_warm_with_keys_selects_entries() {
        let job = parse(
            r#"{"id":"c1","type":"cache:warm","data":{"keys":["orders:summary","orders:summary"]}}"#,
        );
        assert_eq!(
            job.request,
            JobRequest::CacheWarm {
                entries: vec![CacheEntry::OrderSummary]
            }
        );
    }

    #[test]
    fn cache_warm_with_unknown_key_is_rejected() {
        let rejection = reject(r#"{"id":"c1","type":"cache:warm","data":{"keys":["users:all"]}}"#);
        assert!(rejection
            .reason
            .contains("unknown cache name \"users:all\""));
        assert!(rejection.reason.contains("orders:status_counts"));
    }

    #[test]
    fn probe_job_needs_no_data() {
        let job = parse(r#"{"id":"p1","type":"verify:probe"}"#);
        assert_eq!(job.request, JobRequest::VerifyProbe);
    }

    #[test]
    fn invalid_json_is_rejected_without_id() {
        let rejection = reject("{not json");
        assert!(rejection.reason.starts_with("job is not valid JSON"));
        assert_eq!(rejection.job_id, None);
    }

    #[test]
    fn non_object_json_is_rejected() {
        assert_eq!(reject("[1,2]").reason, "job is not a JSON object");
        assert_eq!(reject("\"text\"").reason, "job is not a JSON object");
    }

    #[test]
    fn unknown_type_is_rejected_with_id() {
        let rejection = reject(r#"{"id":"u1","type":"report:build","data":{}}"#);

        assert_eq!(rejection.job_id.as_deref(), Some("u1"));
        assert_eq!(rejection.job_type.as_deref(), Some("report:build"));
        assert!(rejection
            .reason
            .starts_with("unknown job type \"report:build\""));
        assert!(rejection.reason.contains("verify:probe"));
    }

    #[test]
    fn missing_fields_are_rejected() {
        assert_eq!(
            reject(r#"{"type":"verify:probe"}"#).reason,
            "job has no \"id\" field"
        );
        assert_eq!(
            reject(r#"{"id":"","type":"verify:probe"}"#).reason,
            "job id is empty"
        );
        assert_eq!(reject(r#"{"id":"x"}"#).reason, "job has no \"type\" field");
        assert_eq!(
            reject(r#"{"id":"x","type":"order:process","data":{}}"#).reason,
            "data.orderId is missing"
        );
        assert_eq!(
            reject(r#"{"id":"x","type":"order:process","data":[1]}"#).reason,
            "job data is not a JSON object"
        );
    }

    #[test]
    fn overlong_id_is_rejected() {
        let raw = format!(
            r#"{{"id":"{}","type":"verify:probe"}}"#,
            "a".repeat(MAX_JOB_ID_LEN + 1)
        );
        assert!(reject(&raw).reason.contains("longer than 200 bytes"));
    }

    #[test]
    fn attempts_counter_is_read() {
        let job = parse(r#"{"id":"p1","type":"verify:probe","attempts":3}"#);
        assert_eq!(job.attempts, 3);

        let job = parse(r#"{"id":"p1","type":"verify:probe","attempts":"3"}"#);
        assert_eq!(job.attempts, 0);
    }
}
