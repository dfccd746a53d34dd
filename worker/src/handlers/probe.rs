//! `verify:probe`: proves to the deploy tool that a worker processes jobs, and carries the
//! times that the benchmark reads pick-up latency from.

use serde_json::json;

use crate::job::Job;
use crate::keys::QueueKeys;

/// Lifetime of a probe result, ten minutes: long enough for `verify` to read it, short
/// enough that probes pushed by a benchmark leave nothing behind for long.
pub const PROBE_RESULT_TTL_SECS: u64 = 600;

/// Returns the command that writes `{"worker", "pickedUpUs", "finishedUs"}` to
/// `yametee:probe:<job id>`, the job's only effect. `worker` is the instance name, and
/// both times are Unix microseconds: when the fetch returned the job, and when this
/// function built the result.
///
/// `SET NX` makes the key its own completion marker: a repeated delivery keeps the
/// first result.
pub fn probe_result_write(job: &Job, instance: &str, picked_up_unix_us: i64) -> redis::Cmd {
    let result = json!({
        "worker": instance,
        "pickedUpUs": picked_up_unix_us,
        "finishedUs": crate::unix_micros(),
    })
    .to_string();

    let mut command = redis::cmd("SET");
    command
        .arg(QueueKeys::probe(&job.id))
        .arg(result)
        .arg("EX")
        .arg(PROBE_RESULT_TTL_SECS)
        .arg("NX");
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_result_names_worker_and_times() {
        let job = crate::job::parse_job(r#"{"id":"p-1","type":"verify:probe"}"#).unwrap();

        let command = probe_result_write(&job, "w@h", 1_700_000_000_000_000);
        let arguments: Vec<String> = command
            .args_iter()
            .map(|argument| match argument {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                redis::Arg::Cursor => String::new(),
            })
            .collect();

        assert_eq!(arguments[0], "SET");
        assert_eq!(arguments[1], "yametee:probe:p-1");
        let result: serde_json::Value = serde_json::from_str(&arguments[2]).unwrap();
        assert_eq!(result["worker"], "w@h");
        assert_eq!(result["pickedUpUs"], 1_700_000_000_000_000_i64);
        assert!(result["finishedUs"].as_i64().unwrap() >= 1_700_000_000_000_000);
        assert_eq!(result.as_object().unwrap().len(), 3);
        assert_eq!(&arguments[3..], ["EX", "600", "NX"]);
    }
}
