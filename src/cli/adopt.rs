//! `driveblk adopt URL`: copies a volume's base image into the volume's
//! folder (server-side on Drive) so the volume no longer depends on the
//! original file.

use clap::Args;

use crate::cli::remote::RemoteArgs;
use crate::volume;

#[derive(Debug, Args)]
pub struct AdoptArgs {
    /// The volume, e.g. gdrive:/vms/win10.
    pub url: String,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Runs `driveblk adopt`.
pub fn run(a: AdoptArgs) -> anyhow::Result<()> {
    let i = volume::adopt(&a.url, &a.remote.options())?;
    println!("volume {} is at generation {}", i.url, i.generation);
    match &i.base_note {
        Some(n) => println!("{n}"),
        None => println!("base: {:?}", i.base),
    }
    println!("The original file may now be renamed, replaced or deleted.");
    Ok(())
}
