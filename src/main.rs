//! The `ferry` command: `ferry run` (the default) starts the sidecar proxy.

use clap::{Parser, Subcommand};
use ferry::bootstrap::Settings;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry's per-pod sidecar proxy. Settings come from FERRY_* environment variables (see README)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => match run() {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry: error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let log = ferry::logging::init(settings.log_format, &settings.log_level);
    let runtime = if settings.workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(settings.workers).enable_all().build()?
    };
    runtime.block_on(ferry::app::run(settings, Some(log)))?;
    // Upgraded connections and pooled-connection tasks are not waited for past the drain.
    runtime.shutdown_background();
    Ok(())
}
