//! driveblk entry point: parses the command line, sets up logging, runs the
//! command, and turns its error into a message and an exit status.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

use driveblk::cli::{run, Cli};
use driveblk::volume::{VolumeError, EXIT_DIVERGED};

/// Buffers at least this large get their own mapping, returned to the
/// system when freed.
const MMAP_THRESHOLD: i32 = 128 << 10;

fn main() -> ExitCode {
    // glibc raises its mmap threshold each time a large block is freed, so
    // chunk and pack buffers end up in per-thread heaps that keep their
    // memory: under heavy write-back the soak's daemon peaked at 276-371
    // MiB instead of about 150. A fixed threshold keeps them out of the
    // heaps (hot-path request buffers are far smaller; docs/benchmarks.md).
    #[cfg(target_env = "gnu")]
    // SAFETY: called before any other thread exists; mallopt only sets a
    // tunable.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
    // `serve --config FILE`: the file's settings go in as flags, before
    // the command line's own (which win).
    let args = match driveblk::cli::config::expand_args(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("driveblk: error: {}", message(&e));
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
    // yup-oauth2 logs its token requests and responses at debug level: a
    // service account's signed assertion, the access tokens, `auth login`'s
    // code and refresh token. Capped at info whatever --log-level or
    // RUST_LOG asks (a filter of its own: no directive of theirs, however
    // specific, lets them through). The HTTP crates log no header values
    // (h2 and hyper leave them out; reqwest dumps the wire only with
    // connection_verbose, never set here).
    let no_token_logs = tracing_subscriber::filter::filter_fn(|m| {
        !(m.target().starts_with("yup_oauth2") && *m.level() > tracing::Level::INFO)
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .finish()
        .with(no_token_logs)
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("driveblk: error: {}", message(&e));
            let diverged = e.chain().any(|c| matches!(c.downcast_ref(), Some(VolumeError::Diverged { .. })));
            if diverged {
                ExitCode::from(EXIT_DIVERGED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and the causes its own text does not already say: most
/// errors here end with their source (`{context}: {source}`), which
/// `{:#}` would print once more (a remote's error twice, or three times
/// under a retry's "gave up").
fn message(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for c in e.chain().skip(1) {
        let t = c.to_string();
        if !out.contains(&t) {
            out = format!("{out}: {t}");
        }
    }
    out
}
