//! `driveblk trim-shared`: keeps a shared cache directory (`serve
//! --shared-cache`) under a size, for cron or a systemd timer.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::cli::size::{human, parse_size};

#[derive(Debug, Args)]
pub struct TrimSharedArgs {
    /// The shared cache directory.
    pub dir: PathBuf,

    /// Delete the least recently used entries until they hold at most 90%
    /// of this.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max: u64,
}

pub fn run(a: TrimSharedArgs) -> anyhow::Result<()> {
    let t = crate::remote::shared::trim(&a.dir, a.max)
        .with_context(|| format!("cannot trim shared cache directory {}", a.dir.display()))?;
    println!(
        "{}: {} entries, {}; removed {} entries, {}",
        a.dir.display(),
        t.entries,
        human(t.bytes),
        t.removed,
        human(t.removed_bytes)
    );
    Ok(())
}
