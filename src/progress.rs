//! Live progress on a terminal: one line per host showing the step it is on. The steps are
//! the `info` events that carry a `host` field, so the code that does the work only logs.
//! When stderr is not a terminal, the same events are printed as plain log lines instead.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The live lines of this process, once a terminal was found.
static LINES: OnceLock<HostLines> = OnceLock::new();

struct HostLines {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

/// A tracing layer that turns host events into live lines.
pub struct ProgressLayer;

impl ProgressLayer {
    pub fn new() -> ProgressLayer {
        LINES.get_or_init(|| HostLines {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: Mutex::new(HashMap::new()),
        });
        ProgressLayer
    }
}

impl Default for ProgressLayer {
    fn default() -> Self {
        Self::new()
    }
}

/// Ends every live line, so that results printed next are not drawn over.
pub fn finish() {
    let Some(lines) = LINES.get() else {
        return;
    };
    let bars = lines
        .bars
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for bar in bars.values() {
        if !bar.is_finished() {
            bar.finish();
        }
    }
}

#[derive(Default)]
struct EventText {
    host: Option<String>,
    message: String,
    fields: String,
}

impl Visit for EventText {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "host" => self.host = Some(value.to_string()),
            "message" => self.message = value.to_string(),
            name => {
                let _ = write!(self.fields, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "host" => self.host = Some(format!("{value:?}")),
            "message" => self.message = format!("{value:?}"),
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }
}

impl<S: Subscriber> Layer<S> for ProgressLayer {
    fn on_event(&self, event: &Event<'_>, _context: Context<'_, S>) {
        let Some(lines) = LINES.get() else {
            return;
        };
        let level = *event.metadata().level();
        let mut text = EventText::default();
        event.record(&mut text);
        let line = format!("{}{}", text.message, text.fields);

        let Some(host) = text.host else {
            let _ = lines.multi.println(format!("{level}: {line}"));
            return;
        };
        if level <= Level::WARN {
            let _ = lines.multi.println(format!("{level} {host}: {line}"));
        }
        let mut bars = lines
            .bars
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bar = bars.entry(host.clone()).or_insert_with(|| {
            let bar = lines.multi.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix:<12} {elapsed:>4} {wide_msg}")
                    .expect("the progress template is valid"),
            );
            bar.set_prefix(host);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        if text.message == "applied" || text.message == "planned" {
            bar.finish_with_message(line);
        } else {
            bar.set_message(line);
        }
    }
}
