//! Log output: plain text lines on stderr, one per event, for journald.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global `tracing` subscriber.
///
/// The level filter comes from `RUST_LOG` (default `info`). Colours are used only when
/// stderr is a terminal and `NO_COLOR` is unset or empty. Under systemd, where the
/// `JOURNAL_STREAM` variable is set, timestamps are left out because journald adds its
/// own to every line.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());

    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false);

    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}
