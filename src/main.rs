//! The `flashcall` binary: CLI parsing, logging, and the commands of SPEC §1.

use clap::{Parser, Subcommand};
use flashcall::dial::{self, DialOptions};
use flashcall::sip::CallerId;
use std::net::SocketAddr;
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
    Dial {
        /// Trunk HOST:PORT (UDP).
        #[arg(long)]
        trunk: String,
        /// Destination number, E.164.
        #[arg(long, conflicts_with = "to_prefix")]
        to: Option<String>,
        /// Number the destinations: prefix + index.
        #[arg(long)]
        to_prefix: Option<String>,
        /// Caller number shown to the callee, E.164.
        #[arg(long, default_value = "+447700900000")]
        from: String,
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Calls per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        password: Option<String>,
        /// Hold after 180/183 before the CANCEL.
        #[arg(long, default_value_t = 0)]
        ring_ms: u64,
        /// No 180/183 by then: CANCEL, outcome no_ringing.
        #[arg(long, default_value_t = 15_000)]
        ring_timeout_ms: u64,
        /// Where the caller number goes: from, pai or both.
        #[arg(long, default_value = "from", value_parser = parse_caller_id)]
        caller_id: CallerId,
        /// Local SIP address (default: loopback for a loopback trunk, else any).
        #[arg(long)]
        bind: Option<SocketAddr>,
        /// One JSON line per call, then a summary line.
        #[arg(long)]
        json: bool,
    },
}

fn parse_caller_id(s: &str) -> Result<CallerId, String> {
    match s {
        "from" => Ok(CallerId::From),
        "pai" => Ok(CallerId::Pai),
        "both" => Ok(CallerId::Both),
        _ => Err(format!("{s:?}: expected from, pai or both")),
    }
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
        Command::Dial {
            trunk,
            to,
            to_prefix,
            from,
            count,
            rate,
            username,
            password,
            ring_ms,
            ring_timeout_ms,
            caller_id,
            bind,
            json,
        } => {
            let opts = DialOptions {
                trunk,
                to,
                to_prefix,
                from,
                count,
                rate,
                username,
                password,
                ring_ms,
                ring_timeout_ms,
                caller_id,
                bind,
                json,
            };
            match runtime.block_on(dial::run(opts)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
