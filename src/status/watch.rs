//! Printing the status once, or refreshing it until Ctrl-C: redrawn in place on a
//! terminal, one block or one JSON line per refresh otherwise.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use super::monitor::Monitor;
use super::report::{self, StatusReport, Style};
use crate::cli::exit;
use crate::report::Format;

/// Output settings of `status`.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// `Human` or `Json`; `cli` rejects `Junit` before this runs.
    pub format: Format,
    /// Interval between refreshes; `None` prints once.
    pub watch: Option<Duration>,
}

/// ANSI: cursor to the top left corner, and clear the whole screen.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";
/// ANSI: cursor to the top left corner.
const CURSOR_HOME: &str = "\x1b[H";
/// ANSI: clear from the cursor to the end of the line.
const CLEAR_LINE_END: &str = "\x1b[K";
/// ANSI: clear from the cursor to the end of the screen.
const CLEAR_SCREEN_END: &str = "\x1b[J";

/// Prints the status once, or every interval until SIGINT or SIGTERM, then closes the
/// connections. Returns the exit code of the last report: 0 when it was ok, else 1.
pub async fn run(mut monitor: Monitor<'_>, output: Output) -> u8 {
    let stdout = std::io::stdout();
    let terminal = stdout.is_terminal();
    let style = Style {
        colour: terminal && std::env::var_os("NO_COLOR").is_none(),
        width: if terminal { terminal_width() } else { None },
    };
    let redraw = terminal && output.format == Format::Human && output.watch.is_some();

    let Some(interval) = output.watch else {
        let report = monitor.refresh().await;
        crate::progress::finish();
        let _ = print(&render(&report, output.format, style, false));
        monitor.close().await;
        return exit_code(&report);
    };

    let (mut interrupt, mut terminate) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(interrupt), Ok(terminate)) => (interrupt, terminate),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("error: cannot listen for Ctrl-C: {error}");
            monitor.close().await;
            return exit::FAILURE;
        }
    };

    let mut code = exit::FAILURE;
    let mut first = true;
    loop {
        let report = tokio::select! {
            report = monitor.refresh() => report,
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        };
        code = exit_code(&report);
        if first {
            crate::progress::finish();
        }

        let text = render(&report, output.format, style, true);
        let printed = if redraw {
            let header = format!("every {} s; Ctrl-C to stop\n\n", interval.as_secs_f64());
            print(&in_place(&(header + &text), first))
        } else if output.format == Format::Human && !first {
            print(&format!("\n{text}"))
        } else {
            print(&text)
        };
        first = false;
        if !printed {
            break;
        }

        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }

    if redraw {
        // The shell's prompt goes below the last screen, not over it.
        println!();
    }
    monitor.close().await;
    code
}

fn render(report: &StatusReport, format: Format, style: Style, watching: bool) -> String {
    match format {
        Format::Json => report::json(report, watching),
        _ => report::human(report, style),
    }
}

/// Prepares `text` to be drawn over the previous screen: from the top left corner, each
/// line clearing what is left of the old one, and the rest of the screen cleared below.
/// The first screen clears everything first, so the command line above it goes away.
fn in_place(text: &str, first: bool) -> String {
    let mut screen = String::from(if first { CLEAR_SCREEN } else { CURSOR_HOME });
    for line in text.lines() {
        screen.push_str(line);
        screen.push_str(CLEAR_LINE_END);
        screen.push('\n');
    }
    screen.push_str(CLEAR_SCREEN_END);
    screen
}

/// Writes `text` to stdout and returns false when stdout is closed, as it is once the
/// reader of `status --watch | head -n 20` exits.
fn print(text: &str) -> bool {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).is_ok() && stdout.flush().is_ok()
}

fn exit_code(report: &StatusReport) -> u8 {
    if report.ok {
        exit::SUCCESS
    } else {
        exit::FAILURE
    }
}

/// Returns the width of the terminal on stdout, in columns.
fn terminal_width() -> Option<usize> {
    // SAFETY: TIOCGWINSZ fills the zero-initialised winsize and keeps no pointer.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let found = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (found && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_screen_clears_everything() {
        assert_eq!(
            in_place("a\nb\n", true),
            "\x1b[H\x1b[2Ja\x1b[K\nb\x1b[K\n\x1b[J"
        );
    }

    #[test]
    fn later_screens_draw_over_the_last() {
        assert_eq!(in_place("a\n", false), "\x1b[Ha\x1b[K\n\x1b[J");
    }
}
