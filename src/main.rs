//! The `flashcall` binary: CLI parsing, logging, and the commands of SPEC §1.

use clap::{Parser, Subcommand};
use flashcall::dial::{self, DialOptions};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "flashcall",
    version,
    about = "Flash Call phone-verification engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Place flash calls straight to a SIP trunk (no HTTP).
    Dial(DialOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLASHCALL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(command) = cli.command else {
        eprintln!(
            "error: `flashcall serve` (HTTP API, pool, sandbox callee) is not built yet; \
             use `flashcall dial --trunk HOST:PORT --to +E164` (see README)"
        );
        return ExitCode::from(2);
    };
    match command {
        Command::Dial(opts) => match runtime.block_on(dial::run(opts)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}
