//! driveblk entry point: turns the command line into a validated config and
//! runs the chosen command.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing_subscriber::EnvFilter;

use driveblk::cli::serve::ServeConfig;
use driveblk::cli::{Cli, Command};
use driveblk::format::qcow2::{LocalBackingOpener, Qcow2Disk, Qcow2Options};
use driveblk::format::raw::RawDisk;
use driveblk::format::{Disk, ImageFormat};
use driveblk::tier::{LocalFile, Storage};
use driveblk::vhost::Server;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&cli.log_level));
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("driveblk: invalid --log-level {:?}: {e}", cli.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let result = match cli.command {
        Command::Serve(args) => ServeConfig::try_from(args).and_then(serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("driveblk: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn open_disk(cfg: &ServeConfig) -> anyhow::Result<Arc<dyn Disk>> {
    let read_only = cfg.device.read_only;
    let file =
        LocalFile::open(&cfg.image, read_only).with_context(|| format!("cannot open image {}", cfg.image.display()))?;
    file.lock(!read_only).with_context(|| format!("image {} is in use by another process", cfg.image.display()))?;
    let storage: Arc<dyn Storage> = Arc::new(file);
    match cfg.format {
        ImageFormat::Raw => Ok(Arc::new(RawDisk::new(storage, read_only)?)),
        ImageFormat::Qcow2 => {
            let opts = Qcow2Options { read_only, ..Default::default() };
            Ok(Arc::new(Qcow2Disk::open(storage, opts, &LocalBackingOpener::new(&cfg.image))?))
        }
    }
}

fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    let disk = open_disk(&cfg)?;
    tracing::info!(socket = %cfg.socket.display(), queues = cfg.device.num_queues, "serving {}", disk.describe());
    let server = Server::bind(disk, cfg.device.clone(), &cfg.socket)?;
    let stop = server.stop_handle();
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("cannot install signal handlers")?;
    std::thread::Builder::new().name("driveblk-signals".into()).spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "shutting down: finishing in-flight requests");
            stop.stop();
        }
    })?;
    server.run()?;
    tracing::info!("stopped cleanly");
    Ok(())
}
