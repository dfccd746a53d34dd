use std::process::ExitCode;

use tracing::{error, info};
use yametee_worker::config::Config;

fn main() -> ExitCode {
    yametee_worker::logging::init();

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(problems) => {
            for problem in &problems {
                error!("Invalid environment: {problem}");
            }
            error!(
                "Environment validation failed with {} problem(s); fix the environment and restart",
                problems.len()
            );
            return ExitCode::FAILURE;
        }
    };
    info!("Environment validation passed");

    // One thread is enough: every job waits on the network, and a single-threaded
    // runtime keeps the resident memory small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            error!("Starting the async runtime failed: {error}");
            return ExitCode::FAILURE;
        }
    };

    match runtime.block_on(yametee_worker::worker::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!("{error}");
            ExitCode::FAILURE
        }
    }
}
