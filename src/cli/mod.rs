//! Command line: clap definitions and their validation into the typed
//! configuration the daemon runs with. No I/O happens here.

pub mod serve;

use clap::{Parser, Subcommand};

/// driveblk: serve VM disk images to QEMU over vhost-user-blk.
#[derive(Debug, Parser)]
#[command(name = "driveblk", version, about, long_about = None)]
pub struct Cli {
    /// Log level or filter (error, warn, info, debug, trace, or a tracing
    /// filter such as `driveblk=debug`). RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve an image as a vhost-user-blk device on a unix socket.
    Serve(serve::ServeArgs),
}
