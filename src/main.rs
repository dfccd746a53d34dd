use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use yametee_deploy::cli::{self, Cli};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(error) => {
            let words: Vec<String> = args
                .iter()
                .map(|arg| arg.to_string_lossy().into_owned())
                .collect();
            return cli::finish_parse_error(error, &words);
        }
    };
    let format = cli.format;
    let errors_exit_one = cli::errors_exit_one(&cli);
    init_logging();

    let lab_context = match cli::prepare(&cli) {
        Ok(context) => context,
        Err(fatal) => return cli::finish(Err(fatal), format, errors_exit_one),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(cli::exit::FAILURE);
        }
    };
    cli::finish(
        runtime.block_on(cli::run(cli, lab_context)),
        format,
        errors_exit_one,
    )
}

/// Logs and progress go to stderr, filtered by `RUST_LOG` (default: info for this tool). On a
/// terminal, without `RUST_LOG`, each host gets one live line with its current step; otherwise
/// events are plain lines, coloured only on a terminal and never when `NO_COLOR` is set.
fn init_logging() {
    let explicit_filter = std::env::var_os("RUST_LOG").is_some();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,yametee_deploy=info"));
    let terminal = std::io::stderr().is_terminal();
    if terminal && !explicit_filter {
        tracing_subscriber::registry()
            .with(filter)
            .with(yametee_deploy::progress::ProgressLayer::new())
            .init();
        return;
    }
    let colour = terminal && std::env::var_os("NO_COLOR").is_none();
    let lines = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false)
        .compact();
    // Who sets RUST_LOG is looking into where the time goes: give each line the seconds since
    // the start. Plain progress lines stay free of it.
    if explicit_filter {
        lines
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .init();
    } else {
        lines.without_time().init();
    }
}
