//! Command line: clap definitions, their validation into typed
//! configuration, and the commands that run them.

pub mod adopt;
pub mod auth;
pub mod cache_dir;
pub mod config;
pub mod control;
pub mod host_ram;
pub mod maintain;
pub mod metrics;
pub mod rekey;
pub mod remote;
pub mod serve;
pub mod shared;
pub mod size;
pub mod status;
pub mod sync;
pub mod unit;
pub mod vm;
pub mod volume;

use clap::{Parser, Subcommand};

/// driveblk: serve VM disk images to QEMU over vhost-user-blk, from local
/// files or from remote volumes through a RAM/SSD cache.
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
    /// Serve an image file or a remote volume as a vhost-user-blk device.
    #[command(args_override_self = true)]
    Serve(serve::ServeArgs),
    /// Upload an image file as a new remote volume.
    Import(volume::ImportArgs),
    /// Create a volume over an image file already on the remote (no upload).
    Attach(volume::AttachArgs),
    /// Copy a volume's base image into the volume (server-side on Drive), so
    /// it no longer depends on the original file.
    Adopt(adopt::AdoptArgs),
    /// Write a volume's image (with local writes) to a standalone file.
    Export(volume::ExportArgs),
    /// Describe a remote volume.
    Info(volume::InfoArgs),
    /// Download a whole volume into its local cache.
    Hydrate(volume::HydrateArgs),
    /// Show the cache and remote counters of a daemon serving a volume.
    Status(volume::StatusArgs),
    /// Google Drive credentials: sign in, or show what is in use.
    #[command(subcommand)]
    Auth(auth::AuthCommand),
    /// Check, against Google Drive with your credentials, every Drive
    /// behaviour driveblk relies on (in a scratch folder).
    Selftest(auth::SelftestArgs),
    /// Upload a volume's local changes now and wait until they are committed.
    Sync(sync::SyncArgs),
    /// Save this host's local changes to a volume as a new volume that
    /// shares its data (after the volume moved on under them).
    Fork(volume::ForkArgs),
    /// Drop this host's local changes to a volume (only when asked).
    DiscardLocal(volume::DiscardArgs),
    /// List a volume's generations (time, host, bytes changed, kind).
    Log(maintain::LogArgs),
    /// Make a new generation equal to an older one (deletes nothing).
    Rollback(maintain::RollbackArgs),
    /// Delete what no kept generation needs; repack mostly-dead packs.
    Gc(maintain::GcArgs),
    /// Wrap an encrypted volume's data key under a new key or passphrase
    /// (rewrites volume.json only).
    Rekey(rekey::RekeyArgs),
    /// Check every object the volume's generations reference is there.
    Verify(maintain::VerifyArgs),
    /// Drop the clean data a running daemon caches in RAM and on SSD.
    DropCache(control::DropCacheArgs),
    /// Keep a shared cache directory (`serve --shared-cache`) under a size.
    TrimShared(shared::TrimSharedArgs),
    /// Install the systemd template unit driveblk@.service.
    InstallUnit(unit::InstallUnitArgs),
    /// Volume config files (`serve --config FILE`).
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// The VM stored with a volume (vm.toml): create or show it.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Print the QEMU command line for the volume's VM.
    QemuArgs(vm::GenArgs),
    /// Print the libvirt domain XML for the volume's VM.
    LibvirtXml(vm::GenArgs),
}

/// Runs a parsed command.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Serve(a) => serve::ServeConfig::try_from(a).and_then(serve::run),
        Command::Import(a) => volume::import(a),
        Command::Attach(a) => volume::attach(a),
        Command::Adopt(a) => adopt::run(a),
        Command::Export(a) => volume::export(a),
        Command::Info(a) => volume::info(a),
        Command::Hydrate(a) => volume::hydrate(a),
        Command::Status(a) => volume::status(a),
        Command::Auth(c) => auth::run(c),
        Command::Selftest(a) => auth::selftest_cmd(a),
        Command::Sync(a) => sync::run(a),
        Command::Fork(a) => volume::fork(a),
        Command::DiscardLocal(a) => volume::discard_local(a),
        Command::Log(a) => maintain::log(a),
        Command::Rollback(a) => maintain::rollback(a),
        Command::Gc(a) => maintain::gc(a),
        Command::Verify(a) => maintain::verify(a),
        Command::Rekey(a) => rekey::run(a),
        Command::DropCache(a) => control::drop_cache(a),
        Command::TrimShared(a) => shared::run(a),
        Command::InstallUnit(a) => unit::install(a),
        Command::Config(c) => config::run(c),
        Command::Vm(c) => vm::vm(c),
        Command::QemuArgs(a) => vm::qemu(a),
        Command::LibvirtXml(a) => vm::libvirt(a),
    }
}
