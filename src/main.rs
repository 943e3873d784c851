//! The `flashcall` binary: CLI parsing, logging, and the commands of SPEC §1.
//! The only place that prints errors; every error names what was wrong.

use clap::{Parser, Subcommand};
use flashcall::config::Config;
use flashcall::dial::{self, DialOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc instead of glibc malloc. Under load glibc spent ~10% of the
/// engine's CPU in `_int_malloc`/`malloc_consolidate`, mostly for hyper's
/// per-read 8 KiB buffers on keep-alive connections, which mimalloc's
/// per-thread free lists recycle without consolidation. Built with
/// `no_thp`: with transparent huge pages mimalloc's fresh arenas faulted in
/// 2 MiB at a time, zeroed on the request path (`clear_page_erms` under a
/// page fault); at 4,000 creates/s turning that off cut create p99 from
/// 17-27 ms to 7.5-7.8 ms, CPU per verification by ~10 µs and peak RSS
/// from ~120 to ~85 MiB (two interleaved load runs each).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Run the engine: SIP, HTTP API, metrics (the default command).
    Serve {
        /// Config file.
        #[arg(long, default_value_os_t = Config::default_path())]
        config: PathBuf,
    },
    /// Place flash calls straight to a SIP trunk (no HTTP).
    Dial(DialOptions),
    /// Validate a config and its number pool; print the code coverage.
    CheckConfig {
        #[arg(long, default_value_os_t = Config::default_path())]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve {
        config: Config::default_path(),
    });
    // serve logs what it does; the one-shot commands only what went wrong.
    let default_level = match command {
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLASHCALL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match command {
        Command::CheckConfig { config } => match flashcall::serve::check_config(&config) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => match flashcall::serve::run_blocking(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Dial(opts) => {
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
