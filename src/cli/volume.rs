//! Volume commands: import, attach, export, info, hydrate, status.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::cli::remote::RemoteArgs;
use crate::cli::serve::{default_cache_dir, CacheArgs};
use crate::cli::size::{human, parse_size};
use crate::cli::status;
use crate::tier::{self, ExportOptions};
use crate::volume::{self, AttachOptions, ImportOptions, VolumeInfo};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Image file to upload (any format; its bytes are stored as they are).
    pub image: PathBuf,
    /// Where to create the volume, e.g. dir:/mnt/nas/win10.
    pub url: String,
    /// Chunk size: the unit of caching, fetching and (later) upload.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub chunk_size: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// An image file already on the remote, e.g. dir:/mnt/nas/win10.qcow2.
    pub base_url: String,
    /// Where to create the volume that uses it as its base.
    pub url: String,
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub chunk_size: u64,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The volume to export.
    pub url: String,
    /// File to write (written to a temporary name, then renamed).
    pub file: PathBuf,
    /// Include local writes kept in this cache directory (the daemon must be
    /// stopped). Default: the volume's default cache directory, if it exists.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Parallel chunk fetches.
    #[arg(long, default_value_t = 16)]
    pub parallel: usize,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    pub url: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct HydrateArgs {
    pub url: String,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The volume URL the daemon serves (finds its default cache directory).
    #[arg(required_unless_present = "cache_dir")]
    pub url: Option<String>,
    /// The cache directory given to `serve --cache-dir`.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

fn print_info(i: &VolumeInfo) {
    println!("volume      {}", i.url);
    println!("id          {}  (format version {})", i.volume_id, i.format_version);
    println!("image       {} ({} bytes)", human(i.image_len), i.image_len);
    println!(
        "chunks      {} of {}: {} stored in {} packs ({} compressed), {} zero, {} from base",
        i.chunks_total,
        human(i.chunk_size),
        i.chunks_packed,
        i.packs,
        human(i.packed_bytes),
        i.chunks_zero,
        i.chunks_base
    );
    println!("generation  {}", i.generation);
    match &i.base {
        Some(b) => println!("base        {b:?}"),
        None => println!("base        none"),
    }
    if let Some(n) = &i.base_note {
        println!("base note   {n}");
    }
    match &i.boot_profile {
        Some((key, bytes, gen)) => {
            println!("boot prof.  {key}: {} of pages, recorded at generation {gen}", human(*bytes))
        }
        None => println!("boot prof.  none yet (the next serve records one)"),
    }
}

pub fn import(a: ImportArgs) -> anyhow::Result<()> {
    let opts = ImportOptions {
        chunk_size: a.chunk_size,
        progress: !a.quiet,
        remote: a.remote.options(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let info = volume::import(&a.image, &a.url, &opts).with_context(|| format!("import of {}", a.image.display()))?;
    eprintln!("imported {} in {:.1} s", a.image.display(), t0.elapsed().as_secs_f64());
    print_info(&info);
    Ok(())
}

pub fn attach(a: AttachArgs) -> anyhow::Result<()> {
    let opts = AttachOptions { chunk_size: a.chunk_size, remote: a.remote.options() };
    let info = volume::attach(&a.base_url, &a.url, &opts)?;
    eprintln!("attached: {} now serves {} without uploading it", a.url, a.base_url);
    print_info(&info);
    Ok(())
}

pub fn export(a: ExportArgs) -> anyhow::Result<()> {
    if a.parallel == 0 || a.parallel > 1024 {
        bail!("--parallel must be between 1 and 1024");
    }
    let cache_dir = match a.cache_dir {
        Some(d) => Some(d),
        None => default_cache_dir(&a.url).ok().filter(|d| d.exists()),
    };
    let opts = ExportOptions { cache_dir, parallel: a.parallel, progress: !a.quiet, remote: a.remote.options() };
    let t0 = Instant::now();
    let s = tier::export(&a.url, &a.file, &opts)?;
    eprintln!(
        "exported {} to {} in {:.1} s: {} chunks from the remote, {} from the local cache ({} with local writes), {} zero",
        human(s.bytes), a.file.display(), t0.elapsed().as_secs_f64(), s.chunks_from_remote, s.chunks_from_cache,
        s.dirty_chunks, s.zero_chunks
    );
    Ok(())
}

pub fn info(a: InfoArgs) -> anyhow::Result<()> {
    let i = volume::info_with(&a.url, &a.remote.options())?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "url": i.url, "volume_id": i.volume_id, "format_version": i.format_version, "created_unix": i.created_unix,
                "image_len": i.image_len, "chunk_size": i.chunk_size, "generation": i.generation,
                "chunks_total": i.chunks_total, "chunks_packed": i.chunks_packed, "chunks_zero": i.chunks_zero,
                "chunks_base": i.chunks_base, "packs": i.packs, "packed_bytes": i.packed_bytes,
                "base": i.base.as_ref().map(|b| format!("{b:?}")), "base_note": i.base_note,
                "boot_profile": i.boot_profile.as_ref().map(|(key, bytes, gen)| serde_json::json!({
                    "key": key, "bytes": bytes, "generation": gen })),
            })
        );
    } else {
        print_info(&i);
    }
    Ok(())
}

pub fn hydrate(a: HydrateArgs) -> anyhow::Result<()> {
    let mut cache = a.cache.options(&a.url, false, &a.remote)?;
    cache.hydrate = true;
    // No guest to record, and every chunk comes whole anyway.
    cache.boot_profile = crate::tier::boot::BootProfileMode::Off;
    let dir = cache.cache_dir.clone();
    let store = tier::open_volume(&a.url, cache)
        .context("(if a daemon is serving this volume, use `serve --hydrate` instead)")?;
    let t0 = Instant::now();
    store.start_hydrate();
    while !store.wait_hydrated(Duration::from_secs(3600), !a.quiet) {}
    let s = store.stats();
    eprintln!(
        "hydrated {} into {} in {:.1} s ({} downloaded): reads of this volume no longer go to the remote",
        human(s.image_len),
        dir.display(),
        t0.elapsed().as_secs_f64(),
        human(s.remote_bytes)
    );
    Ok(())
}

pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let dir = match (a.cache_dir, a.url) {
        (Some(d), _) => d,
        (None, Some(url)) => default_cache_dir(&url)?,
        (None, None) => bail!("give a volume URL or --cache-dir"),
    };
    let v = status::read(&dir)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", status::render(&v));
    }
    Ok(())
}
