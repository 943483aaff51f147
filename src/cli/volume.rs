//! Volume commands: import, attach, export, info, hydrate, status.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::cli::control;
use crate::cli::remote::RemoteArgs;
use crate::cli::serve::{default_cache_dir, CacheArgs};
use crate::cli::size::{human, parse_size};
use crate::cli::status;
use crate::tier::pins::{parse_ranges, Pins};
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
    /// The image's format (raw or qcow2), recorded in the volume so that
    /// `serve` needs no --format. Never guessed from the contents.
    #[arg(long)]
    pub format: Option<crate::format::ImageFormat>,
    /// Encrypt the volume with a new random data key, wrapped by the key
    /// from --key-file, --key-env or --passphrase (docs/encryption.md).
    #[arg(long)]
    pub encrypt: bool,
    /// Import with --format raw although the file starts like another
    /// image format or a compressed file (a raw disk a guest keeps an
    /// image in, from its first sector on).
    #[arg(long)]
    pub force_raw: bool,
    /// Store each chunk as one zstd frame, as versions before sub-frames
    /// did (misses then fetch whole chunks; for comparisons).
    #[arg(long, hide = true)]
    pub single_frames: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// An image file already on the remote, e.g. dir:/mnt/nas/win10.qcow2.
    pub base_url: String,
    /// Where to create the volume that uses it as its base.
    pub url: String,
    /// Chunk size: the unit of caching, fetching and upload.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub chunk_size: u64,
    /// The image's format (raw or qcow2), recorded in the volume.
    #[arg(long)]
    pub format: Option<crate::format::ImageFormat>,
    /// Encrypt what the volume stores (its changes, manifests, profiles);
    /// the base file stays as it is, plaintext.
    #[arg(long)]
    pub encrypt: bool,
    /// Attach with --format raw although the file starts like another
    /// image format or a compressed file.
    #[arg(long)]
    pub force_raw: bool,
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
    /// Parallel chunk fetches. Default: 64 MiB of chunks in flight (64 of
    /// 1 MiB), what a link with a round trip needs to stay full.
    #[arg(long)]
    pub parallel: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The volume to describe.
    pub url: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct HydrateArgs {
    /// The volume to download into its cache directory.
    pub url: String,
    /// Instead of the whole volume, fetch and pin part of it: `profile`
    /// (every chunk the volume's newest boot profile touches: the guest's
    /// hot set, to run without a network), or byte ranges `START-END` /
    /// `START+LEN` (e.g. `0-2G,30G+1G`). Pinned chunks are never evicted
    /// and every later start keeps them (saved in the cache directory);
    /// `driveblk status` says "offline ready" once the hot set is local.
    /// With a daemon serving the volume, the daemon pins and fetches them,
    /// behind the guest's own reads.
    #[arg(long, value_name = "profile|RANGES")]
    pub pin: Option<String>,
    #[command(flatten)]
    pub control: crate::cli::control::ControlArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The volume URL: shows who holds its writer lease (read from the
    /// remote, from any host), and the local daemon's counters if this
    /// host has a cache of it.
    #[arg(required_unless_present_any = ["cache_dir", "control"])]
    pub url: Option<String>,
    /// The cache directory given to `serve --cache-dir`.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub control: crate::cli::control::ControlArgs,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct ForkArgs {
    /// The volume the local changes were made on.
    pub url: String,
    /// Where to create the new volume (shares URL's data; only the local
    /// changes are uploaded).
    pub new_url: String,
    /// The cache directory holding the changes (default: URL's).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Give up waiting for the upload after this many seconds (the changes
    /// stay in the cache, tied to the new volume).
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub timeout: u64,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct DiscardArgs {
    /// The volume whose local changes to drop.
    pub url: String,
    /// The cache directory holding them (default: URL's).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Also remove a cache a newer driveblk wrote (refused otherwise: that
    /// version can still upload its writes; its writer lease stays).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
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
    println!("format      {}", i.image_format.as_deref().unwrap_or("not recorded (serve needs --format)"));
    println!("generation  {}", i.generation);
    match &i.encrypted {
        Some(id) => println!(
            "encrypted   yes, AES-256-GCM (key id {id}){}",
            if i.base.is_some() { "; the base file is not: it stays plaintext" } else { "" }
        ),
        None => println!("encrypted   no"),
    }
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
    use crate::tier::Storage;
    let image = a.image.display().to_string();
    // Held with QEMU's read lock until the upload is done: a VM writing the
    // image meanwhile is refused, and cannot start on it until then.
    let file = crate::tier::LocalFile::open(&a.image, true).with_context(|| format!("cannot open {image}"))?;
    file.lock(false).with_context(|| {
        format!(
            "{image} is in use by a running VM (QEMU, qemu-storage-daemon or driveblk has it open for writing), \
             and a copy taken while the guest writes is no consistent disk: shut the VM down first; nothing was \
             uploaded"
        )
    })?;
    let mut head = vec![0u8; crate::format::probe::PROBE_BYTES.min(file.len() as usize)];
    file.read_at(0, &mut head).with_context(|| format!("cannot read {image}"))?;
    check_format(&image, &head, a.format, a.force_raw)?;
    if a.format == Some(crate::format::ImageFormat::Qcow2) {
        check_qcow2_servable(&image, &file)?;
    }
    let opts = ImportOptions {
        chunk_size: a.chunk_size,
        progress: !a.quiet,
        remote: a.remote.options(),
        image_format: a.format.map(|f| f.to_string()),
        encrypt: a.encrypt,
        subframes: !a.single_frames,
        ..Default::default()
    };
    let t0 = Instant::now();
    let info = volume::import(&a.image, &a.url, &opts).with_context(|| format!("import of {image}"))?;
    drop(file);
    eprintln!("imported {image} in {:.1} s", t0.elapsed().as_secs_f64());
    print_info(&info);
    Ok(())
}

/// Refuses, before anything is uploaded, a file no format driveblk serves
/// can read (a VMDK, VDI, VHDX, a gzipped qcow2, ...), and a qcow2 given
/// as raw: stored as it is and served as a raw disk, the guest would find
/// the container's bytes where its disk should be.
fn check_format(
    image: &str,
    head: &[u8],
    format: Option<crate::format::ImageFormat>,
    force_raw: bool,
) -> anyhow::Result<()> {
    use crate::format::probe::{probe, Probed};
    use crate::format::ImageFormat;
    let raw = format == Some(ImageFormat::Raw);
    if force_raw && raw {
        return Ok(());
    }
    let hint = if raw { "; a raw disk that only starts like one: add --force-raw" } else { "" };
    match probe(head) {
        Probed::Foreign { name, qemu_fmt } => bail!(
            "{image} is a {name} image, which driveblk cannot serve (as a raw disk the guest would see the {qemu_fmt} \
             file, not the disk in it): convert it first, `qemu-img convert -f {qemu_fmt} -O qcow2 {image} \
             disk.qcow2`, and import disk.qcow2 with --format qcow2; nothing was uploaded{hint}"
        ),
        Probed::Packed { name, unpack } => bail!(
            "{image} is a {name} file, not a disk image: unpack it first (`{unpack} {image}`) and import the image \
             inside (one in another format than raw or qcow2: `qemu-img convert -O qcow2 IMAGE disk.qcow2`); \
             nothing was uploaded{hint}"
        ),
        Probed::Qcow2 if raw => bail!(
            "{image} is a qcow2 image: import it with --format qcow2 (as a raw disk the guest would see the qcow2 \
             file, not the disk in it); nothing was uploaded{hint}"
        ),
        Probed::Qcow2 | Probed::Unknown => Ok(()),
    }
}

/// Refuses, before anything is uploaded, a qcow2 a volume could never
/// serve: one whose header the engine refuses, or an overlay (a volume
/// holds one file; the backing file's data would not be in it).
fn check_qcow2_servable(image: &str, file: &crate::tier::LocalFile) -> anyhow::Result<()> {
    let info = crate::format::qcow2::info(file)
        .with_context(|| format!("{image} cannot be served as a qcow2; nothing was uploaded"))?;
    if info.corrupt {
        // Served, it would be read-only at best: the way out needs the file.
        bail!(
            "{image} is marked corrupt (QEMU found its metadata inconsistent and stopped writing it): repair it \
             first with `qemu-img check -r all {image}`, then import it; nothing was uploaded"
        );
    }
    if let Some(b) = info.backing_file {
        bail!(
            "{image} is a qcow2 overlay on the backing file {b:?}, and a volume holds one image file: flatten it \
             first (`qemu-img convert -O qcow2 {image} flat.qcow2` copies the backing file's data in) and import \
             that; nothing was uploaded"
        );
    }
    Ok(())
}

pub fn attach(a: AttachArgs) -> anyhow::Result<()> {
    let n = crate::format::probe::PROBE_BYTES as u64;
    let head = volume::base_head(&a.base_url, &a.url, n, &a.remote.options())?;
    check_format(&a.base_url, &head, a.format, a.force_raw)?;
    if a.format == Some(crate::format::ImageFormat::Qcow2) {
        if let Some(why) = crate::format::qcow2::refusal_in_head(&head) {
            bail!("{} cannot be served as a qcow2: {why}; nothing was written", a.base_url);
        }
    }
    let opts = AttachOptions {
        chunk_size: a.chunk_size,
        remote: a.remote.options(),
        image_format: a.format.map(|f| f.to_string()),
        encrypt: a.encrypt,
    };
    let info = volume::attach(&a.base_url, &a.url, &opts)?;
    eprintln!("attached: {} now serves {} without uploading it", a.url, a.base_url);
    print_info(&info);
    Ok(())
}

pub fn export(a: ExportArgs) -> anyhow::Result<()> {
    if a.parallel.is_some_and(|p| p == 0 || p > 1024) {
        bail!("--parallel must be between 1 and 1024");
    }
    let cache_dir = match a.cache_dir {
        Some(d) => Some(d),
        None => match default_cache_dir(&a.url, &a.remote.options()) {
            Ok(d) if d.exists() => Some(d),
            Ok(_) => None,
            Err(e) => {
                eprintln!(
                    "warning: {e:#}; exporting the volume as committed on the remote: local writes not uploaded \
                     yet, if any, are left out (pass --cache-dir to include them)"
                );
                None
            }
        },
    };
    let opts =
        ExportOptions { cache_dir, parallel: a.parallel.unwrap_or(0), progress: !a.quiet, remote: a.remote.options() };
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
                "chunks_base": i.chunks_base, "image_format": i.image_format, "packs": i.packs, "packed_bytes": i.packed_bytes,
                "base": i.base.as_ref().map(|b| format!("{b:?}")),
                "chunks_base": i.chunks_base, "packs": i.packs, "packed_bytes": i.packed_bytes,
                "base": i.base.as_ref().map(|b| format!("{b:?}")), "base_note": i.base_note,
                "encrypted": i.encrypted.is_some(), "key_id": i.encrypted,
                "boot_profile": i.boot_profile.as_ref().map(|(key, bytes, gen)| serde_json::json!({
                    "key": key, "bytes": bytes, "generation": gen })),
            })
        );
    } else {
        print_info(&i);
        match crate::cli::maintain::space_lines(&a.url, &a.remote) {
            Ok(l) => print!("{l}"),
            Err(e) => println!("space       unknown: {e:#}"),
        }
    }
    Ok(())
}

pub fn hydrate(a: HydrateArgs) -> anyhow::Result<()> {
    if let Some(spec) = &a.pin {
        return hydrate_pin(&a, spec);
    }
    let dir = control::cache_dir_of(Some(&a.url), a.cache.cache_dir.as_deref());
    if let Some(ctl) = control::find(a.control.control.as_deref(), dir.as_deref())? {
        return hydrate_through_daemon(&ctl, a.quiet);
    }
    let mut cache = a.cache.options(&a.url, false, &a.remote)?;
    cache.hydrate = true;
    // Downloading needs no lease (only uploading left-over changes would).
    cache.lease = tier::LeaseMode::OnCommit;
    // No guest to record, and every chunk comes whole anyway.
    cache.boot_profile = crate::tier::boot::BootProfileMode::Off;
    fill_the_link(&mut cache);
    let dir = cache.cache_dir.clone();
    let store = tier::open_volume(&a.url, cache).context(
        "(if a daemon is serving this volume from another cache directory, pass its --cache-dir or --control)",
    )?;
    let t0 = Instant::now();
    store.start_hydrate();
    while !store.wait_hydrated(Duration::from_secs(3600), !a.quiet) {
        // Ended with chunks left out: say why, never spin.
        let s = store.stats();
        if !s.hydrating {
            bail!(
                "hydration stopped having fetched {} of {} chunks: {}; what was fetched is kept, run hydrate again",
                s.hydrate_done,
                s.hydrate_total,
                store.hydrate_error().unwrap_or_else(|| "some chunks could not be fetched".into())
            );
        }
    }
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

/// `hydrate` in the foreground has no guest to keep the link for: it fills
/// it (the background hydration and pinning of `serve` keep their low
/// defaults). With the defaults, `hydrate --pin` of 2.4 GiB over a 25 MB/s
/// link took 184.9 s.
fn fill_the_link(cache: &mut tier::CacheOptions) {
    cache.hydrate_concurrency = cache.fetch_concurrency;
    cache.speculative_bytes = cache.speculative_bytes.max(cache.fetch_concurrency as u64 * (1 << 20));
}

/// `hydrate --pin`: pins part of the volume and waits until it is local.
fn hydrate_pin(a: &HydrateArgs, spec: &str) -> anyhow::Result<()> {
    let pins = if spec.eq_ignore_ascii_case("profile") {
        Pins { ranges: Vec::new(), profile: true }
    } else {
        let ranges = parse_ranges(spec, parse_size).map_err(|e| anyhow::anyhow!("--pin: {e}"))?;
        Pins { ranges: ranges.into_iter().map(|r| [r.start, r.end]).collect(), profile: false }
    };
    let dir = control::cache_dir_of(Some(&a.url), a.cache.cache_dir.as_deref());
    if let Some(ctl) = control::find(a.control.control.as_deref(), dir.as_deref())? {
        return pin_through_daemon(&ctl, pins, a.quiet);
    }
    let mut cache = a.cache.options(&a.url, false, &a.remote)?;
    cache.boot_profile = crate::tier::boot::BootProfileMode::Off;
    fill_the_link(&mut cache);
    let dir = cache.cache_dir.clone();
    let store = tier::open_volume(&a.url, cache).context(
        "(if a daemon is serving this volume from another cache directory, pass its --cache-dir or --control)",
    )?;
    let t0 = Instant::now();
    store.pin(&pins)?;
    let all = store.wait_pinned(Duration::from_secs(24 * 3600), !a.quiet);
    let s = store.stats();
    if s.pinned_chunks > s.ssd_cap / s.chunk_size.max(1) {
        eprintln!(
            "warning: {} pinned is more than the SSD cache ({}): other data can no longer be cached",
            human(s.pinned_chunks * s.chunk_size),
            human(s.ssd_cap)
        );
    }
    eprintln!(
        "pinned {} chunks ({}) in {} in {:.1} s ({} downloaded){}",
        s.pinned_chunks,
        human(s.pinned_chunks * s.chunk_size),
        dir.display(),
        t0.elapsed().as_secs_f64(),
        human(s.remote_bytes),
        match (all, s.offline_ready) {
            (false, _) => format!(
                ": {} chunks could not be fetched (see the log); run it again",
                s.pinned_chunks - s.pinned_local
            ),
            (true, Some(true)) => ": offline-ready".to_string(),
            (true, _) => String::new(),
        }
    );
    if !all {
        bail!("not every pinned chunk is local");
    }
    Ok(())
}

/// How long `status URL` waits for the remote's view of the lease before
/// it prints what this host knows without it.
const LEASE_WAIT: Duration = Duration::from_secs(20);

pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let dir = match (&a.cache_dir, &a.url) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(url)) => default_cache_dir(url, &a.remote.options()).ok(),
        (None, None) => None,
    };
    // This host's daemon: live on its control socket, or the last state a
    // stopped one left in the cache directory.
    let local = match control::find(a.control.control.as_deref(), dir.as_deref())? {
        Some(ctl) => Some(control::request(&ctl, &control::Request::Status)?),
        None => match (&dir, &a.url) {
            (Some(d), None) => Some(status::read(d)?),
            (Some(d), Some(_)) => status::read(d).ok(),
            (None, _) => None,
        },
    };
    let Some(url) = a.url else {
        let v = local.ok_or_else(|| anyhow::anyhow!("give a volume URL, --cache-dir or --control"))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", status::render(&v));
        }
        return Ok(());
    };
    // The lease as the remote has it, then this host's daemon if any. A
    // silent remote (whose retries may go on for many minutes) must not
    // hide what this host knows: the lease waits at most LEASE_WAIT.
    let lease = {
        let (tx, rx) = std::sync::mpsc::channel();
        let (u, opts) = (url.clone(), a.remote.options());
        std::thread::Builder::new()
            .name("driveblk-lease-status".into())
            .spawn(move || {
                let _ = tx.send(volume::lease::lease_status(&u, &opts));
            })
            .context("cannot start a thread")?;
        match rx.recv_timeout(LEASE_WAIT) {
            Ok(r) => Some(r?),
            // Left running: the process ends after printing.
            Err(_) => None,
        }
    };
    let unknown = || format!("unknown: the remote did not answer within {} s", LEASE_WAIT.as_secs());
    if a.json {
        let v = match &lease {
            Some(lease) => serde_json::json!({
                "lease": {
                    "standing": format!("{:?}", lease.standing).to_lowercase(),
                    "describe": lease.describe(),
                    "holder": lease.holder.as_ref().map(|h| serde_json::to_value(h).unwrap_or_default()),
                    "silent_ms": lease.silent_ms,
                    "generation": lease.generation,
                },
                "local": local,
            }),
            None => serde_json::json!({ "lease": { "standing": "unknown", "describe": unknown() }, "local": local }),
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("lease       {}", lease.as_ref().map_or_else(unknown, |l| l.describe()));
        match &local {
            Some(v) => {
                print!("{}", status::render(v));
                if let Some(h) = crate::cli::maintain::quota_hint(&url, v) {
                    print!("{h}");
                }
            }
            None => println!("local       no daemon status on this host"),
        }
    }
    Ok(())
}

pub fn fork(a: ForkArgs) -> anyhow::Result<()> {
    let default_dir = default_cache_dir(&a.url, &a.remote.options())?;
    let dir = a.cache_dir.clone().unwrap_or_else(|| default_dir.clone());
    let remote = a.remote.options();
    let f = tier::fork(&a.url, &a.new_url, &dir, &remote)?;
    eprintln!(
        "created {} (volume {}): generation 1 is {} at generation {} (its data shared, not copied), \
         with {} chunks of local changes to upload",
        a.new_url, f.volume_id, a.url, f.from_generation, f.dirty_chunks
    );
    // The cache now belongs to the fork: under the fork's default name
    // when it had the origin's.
    let dir = if a.cache_dir.is_none() {
        let new_dir = default_cache_dir(&a.new_url, &a.remote.options())?;
        if new_dir.exists() {
            eprintln!("note: {} exists; the fork's cache stays at {}", new_dir.display(), dir.display());
            dir
        } else {
            std::fs::rename(&dir, &new_dir)
                .with_context(|| format!("moving the cache {} to {}", dir.display(), new_dir.display()))?;
            new_dir
        }
    } else {
        dir
    };
    let args = crate::cli::serve::CacheArgs::for_dir(dir.clone());
    let mut opts = args.options(&a.new_url, false, &a.remote)?;
    opts.boot_profile = crate::tier::boot::BootProfileMode::Off;
    let store = tier::open_volume(&a.new_url, opts).context("cannot open the fork with its cache")?;
    let done = store.sync_now(Duration::from_secs(a.timeout));
    store.close(Duration::ZERO);
    let st = store.sync_status().unwrap_or_default();
    if !done {
        bail!(
            "the fork exists, but its local changes are not all uploaded yet ({}); they stay in {} — run \
             `driveblk sync {} --cache-dir {}`",
            st.last_error.unwrap_or_else(|| "timed out".into()),
            dir.display(),
            a.new_url,
            dir.display()
        );
    }
    eprintln!(
        "saved: {} at generation {} holds the local changes ({} uploaded); serve it with `--volume {}`{}",
        a.new_url,
        store.volume().generation(),
        human(st.bytes_uploaded),
        a.new_url,
        if a.cache_dir.is_some() { format!(" --cache-dir {}", dir.display()) } else { String::new() }
    );
    Ok(())
}

pub fn discard_local(a: DiscardArgs) -> anyhow::Result<()> {
    let dir = match a.cache_dir {
        Some(d) => d,
        None => default_cache_dir(&a.url, &a.remote.options())?,
    };
    let dropped = match tier::discard_local(&a.url, &dir, &a.remote.options(), a.force)? {
        Some(b) => format!("dropped {} of local changes", human(b)),
        None => "removed a cache whose state could not be read (what it held is unknown)".to_string(),
    };
    eprintln!("{dropped} in {}; the next start follows {}'s newest generation", dir.display(), a.url);
    Ok(())
}

/// `hydrate --pin` with a daemon serving the volume: it pins and fetches
/// (behind the guest's misses); this waits until the pinned chunks are
/// local, showing progress.
fn pin_through_daemon(ctl: &std::path::Path, pins: Pins, quiet: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    control::request(ctl, &control::Request::Pin { profile: pins.profile, ranges: pins.ranges })?;
    let bar = crate::volume::progress::bar(!quiet, 0, "pin");
    loop {
        // The daemon reads `pinning` before the counts: once it is false,
        // they are final.
        let v = control::request(ctl, &control::Request::Status)?;
        let u = |p: &str| v.pointer(p).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let (pinned, local) = (u("/hot_set/pinned"), u("/hot_set/pinned_local"));
        bar.set_length(pinned);
        bar.set_position(local);
        if v.pointer("/hot_set/pinning").and_then(serde_json::Value::as_bool) != Some(true) {
            bar.finish_and_clear();
            let chunk = u("/chunk_size");
            let ready = match v.pointer("/hot_set/offline_ready").and_then(serde_json::Value::as_bool) {
                Some(true) if local == pinned => ": offline-ready",
                _ => "",
            };
            eprintln!(
                "pinned {pinned} chunks ({}) in {:.1} s through the daemon{ready}",
                human(pinned * chunk),
                t0.elapsed().as_secs_f64()
            );
            if local < pinned {
                bail!(
                    "{} of {pinned} pinned chunks could not be fetched (remote errors: {}); run it again",
                    pinned - local,
                    u("/remote/errors")
                );
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asks the running daemon to hydrate, and follows it until every chunk
/// is local.
fn hydrate_through_daemon(ctl: &std::path::Path, quiet: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let r = control::request(ctl, &control::Request::Hydrate)?;
    let bar = crate::volume::progress::bar(!quiet, r["total"].as_u64().unwrap_or(0), "hydrate");
    loop {
        let v = control::request(ctl, &control::Request::Status)?;
        let u = |p: &str| v.pointer(p).and_then(serde_json::Value::as_u64).unwrap_or(0);
        bar.set_length(u("/hydrate/total"));
        bar.set_position(u("/hydrate/done"));
        if v["hydrate"]["complete"].as_bool() == Some(true) {
            bar.finish_and_clear();
            eprintln!(
                "hydrated {} in {:.1} s through the daemon: reads of this volume no longer go to the remote",
                human(u("/image_len")),
                t0.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if v["hydrate"]["running"].as_bool() != Some(true) {
            bar.finish_and_clear();
            bail!(
                "hydration stopped at {}/{} chunks (remote errors: {}); run it again",
                u("/hydrate/done"),
                u("/hydrate/total"),
                u("/remote/errors")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
