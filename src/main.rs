//! driveblk entry point: parses the command line, sets up logging, runs the
//! command, and turns its error into a message and an exit status.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use driveblk::cli::{run, Cli};

fn main() -> ExitCode {
    // `serve --config FILE`: the file's settings go in as flags, before
    // the command line's own (which win).
    let args = match driveblk::cli::config::expand_args(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("driveblk: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let filter = match EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&cli.log_level)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("driveblk: invalid --log-level {:?}: {e}", cli.log_level);
            return ExitCode::from(2);
        }
    };
    // journald and log files get plain text; colours only on a terminal.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("driveblk: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
