//! `driveblk serve`: arguments, their validation, and running the server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::cli::control::{self, ControlServer};
use crate::cli::metrics::MetricsServer;
use crate::cli::remote::RemoteArgs;
use crate::cli::size::{human, parse_size};
use crate::cli::status::{DaemonStatus, Phase, StatusWriter};
use crate::cli::unit::Notifier;
use crate::cli::vm::{VmSpec, VM_FILE};
use crate::format::qcow2::{BackingOpener, LocalBackingOpener, NoBacking, Qcow2Disk, Qcow2Options};
use crate::format::raw::RawDisk;
use crate::format::{Disk, ImageFormat};
use crate::remote::RemoteMetrics;
use crate::tier::boot::BootProfileMode;
use crate::tier::open::{OnRemoteError, RemoteWait};
use crate::tier::tiered::{CacheMode, TieredStore};
use crate::tier::{self as tier_layer, CacheOptions};
use crate::tier::{LocalFile, Storage};
use crate::vhost::config::ID_BYTES;
use crate::vhost::{DeviceConfig, Server};
use crate::volume::gc::GcOptions;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A volume's TOML config file holding any of these options (keys are
    /// the flag names with underscores: `num_queues = 2`); flags given here
    /// override it. `driveblk config check FILE` validates one.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Path of the vhost-user unix socket to listen on (QEMU connects to it
    /// with `-chardev socket,path=...`).
    #[arg(long)]
    pub socket: PathBuf,

    /// Image file to serve from local disk.
    #[arg(long, conflicts_with = "volume", required_unless_present = "volume")]
    pub image: Option<PathBuf>,

    /// Remote volume to serve through the RAM/SSD cache, e.g. dir:/mnt/nas/win10.
    #[arg(long, value_name = "URL")]
    pub volume: Option<String>,

    /// Image format: raw or qcow2. Never guessed from the contents.
    /// Required for --image; a volume records its format at import
    /// (`import --format`), and this overrides it.
    #[arg(long)]
    pub format: Option<ImageFormat>,

    /// Export the disk read-only (the guest sees a read-only device). A
    /// read-only volume needs no writer lease: it works while another host
    /// writes.
    #[arg(long)]
    pub read_only: bool,

    /// Take the volume's writer lease even though another host holds it.
    /// Its changes not yet uploaded then fork: its next commit is refused
    /// and they stay on that host (`driveblk fork` there saves them).
    #[arg(long, conflicts_with = "read_only")]
    pub force_takeover: bool,

    /// A throwaway disk for one of many VMs booting the same volume: the
    /// guest may write, but its writes stay in this daemon's cache, are
    /// never uploaded, need no writer lease, and are dropped at the next
    /// start (docs/object-stores.md, "Fleets").
    #[arg(long, conflicts_with_all = ["read_only", "force_takeover"], requires = "volume")]
    pub ephemeral: bool,

    /// Number of virtqueues (one worker thread each). Default: the
    /// volume's vm.toml (`driveblk vm init`), else 1.
    #[arg(long)]
    pub num_queues: Option<u16>,

    /// Maximum virtqueue size the frontend may configure (power of two).
    /// The default is QEMU's largest (queue-size=1024).
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u16,

    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    /// Default: the volume's vm.toml disk_serial, else `driveblk`.
    #[arg(long)]
    pub serial: Option<String>,

    /// Threads for requests that must wait (cache misses, allocation, flush).
    #[arg(long, default_value_t = 32)]
    pub io_threads: usize,

    /// Microseconds a queue worker keeps polling for new requests before it
    /// sleeps: lower latency for busy guests, a little CPU when idle. 0 = off.
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub poll_us: u64,

    /// Threads per queue (1 or 2). With 2, a queue that pops many reads at
    /// once runs half of them on a second thread, so one busy queue can use
    /// two CPUs; the second thread sleeps while the queue is quiet.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub queue_threads: u8,

    /// Most qcow2 L2 tables to keep in memory, in bytes. Default: all of them
    /// (lookups never do I/O). A smaller cap loads tables on demand.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub metadata_cache: Option<u64>,

    /// Control socket (status, sync, hydrate, drop-cache) of a volume
    /// daemon. Default: `<socket>.ctl`.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Group to give the vhost and control sockets (e.g. `kvm` or
    /// `libvirt-qemu`, so QEMU can connect). Default: the daemon's group.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Permissions of the vhost and control sockets, octal (e.g. 0660).
    /// Default: from the umask.
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,

    /// Serve Prometheus metrics (the status figures) on this address,
    /// e.g. 127.0.0.1:9187, at /metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,

    #[command(flatten)]
    pub cache: CacheArgs,

    #[command(flatten)]
    pub remote: RemoteArgs,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode like 0660"))?;
    if m > 0o777 {
        return Err(format!("{s:?}: a socket mode is at most 0777"));
    }
    Ok(m)
}

/// Owner group and mode for the sockets QEMU connects to.
#[derive(Debug, Clone, Default)]
pub struct SocketPerms {
    pub gid: Option<u32>,
    pub mode: Option<u32>,
}

impl SocketPerms {
    fn new(group: Option<&str>, mode: Option<u32>) -> anyhow::Result<Self> {
        let gid = match group {
            None => None,
            Some(g) if g.chars().all(|c| c.is_ascii_digit()) => Some(g.parse()?),
            Some(g) => {
                let name = std::ffi::CString::new(g)?;
                // SAFETY: getgrnam returns a pointer into static storage or null; read at once.
                let gr = unsafe { libc::getgrnam(name.as_ptr()) };
                if gr.is_null() {
                    bail!("--socket-group: no group named {g:?}");
                }
                Some(unsafe { (*gr).gr_gid })
            }
        };
        Ok(Self { gid, mode })
    }

    /// Applies the group and mode to a socket file.
    pub fn apply(&self, path: &std::path::Path) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(gid) = self.gid {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("cannot give {} to group {gid}", path.display()))?;
        }
        if let Some(m) = self.mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(m))
                .with_context(|| format!("cannot set mode {m:o} on {}", path.display()))?;
        }
        Ok(())
    }
}

/// Cache settings for a volume (serve, hydrate).
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// The volume's local cache directory (SSD tier). Default: a directory
    /// per volume under $DRIVEBLK_CACHE, /var/cache/driveblk (root) or
    /// ~/.cache/driveblk.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// RAM tier size.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub ram_cache: u64,

    /// SSD tier size for clean chunks (local writes are kept regardless).
    #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = parse_size)]
    pub ssd_cache: u64,

    /// Free space the SSD tier's clean data leaves on the cache's
    /// filesystem, for changes not uploaded yet (this daemon's, or another
    /// daemon's with its cache on the same disk): past it clean chunks are
    /// evicted, whatever the cap. Default: a twentieth of the filesystem,
    /// at most 4G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub ssd_min_free: Option<u64>,

    /// Keep the SSD cache encrypted on disk (AES-256-XTS per 4 KiB page,
    /// under a key derived from the volume's data key): nothing the guest
    /// reads or writes is stored there in plaintext. Needs an encrypted
    /// volume (`import --encrypt`). A cache once encrypted stays so.
    #[arg(long)]
    pub encrypt_cache: bool,

    /// Download the whole volume into the SSD tier in the background, at
    /// lowest priority; afterwards no read goes to the remote.
    #[arg(long)]
    pub hydrate: bool,

    /// A first boot with no boot profile fetches the whole volume from the
    /// start, behind the guest's own reads, when the volume stores at most
    /// this much (a small image comes down faster than its boot's misses
    /// would take one round trip at a time). 0 turns it off; larger volumes
    /// stream only the regions the boot reads densely, within 3x its reads.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub first_boot_whole_below: u64,

    /// A chunk directory shared by every daemon of a fleet booting the
    /// same volumes (one host, or several over NFSv4): a lower tier between
    /// this daemon's own cache and the remote, so each range is fetched
    /// from the remote about once. Holds the remote's bytes as sent
    /// (ciphertext for encrypted volumes), checked on use like remote bytes.
    #[arg(long, value_name = "DIR")]
    pub shared_cache: Option<PathBuf>,

    /// Size cap of --shared-cache: past it, the least recently used
    /// entries are deleted. Default: no cap (`driveblk trim-shared`
    /// from cron is the other way).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "shared_cache")]
    pub shared_cache_max: Option<u64>,

    /// Parallel chunk fetches from the remote.
    #[arg(long, default_value_t = 32)]
    pub fetch_concurrency: usize,

    /// Most chunks a sequential stream reads ahead (0 disables readahead).
    #[arg(long, default_value_t = 8)]
    pub readahead_chunks: u64,

    /// Boot profiles. auto: at start, stream the volume's newest boot
    /// profile (the pages earlier boots read first) into the cache ahead of
    /// the guest; record this boot, and save it to the remote if the volume
    /// has no profile or more than 2% of what the boot read is not in it
    /// (not with --read-only, which writes nothing to the volume). record:
    /// save this boot's profile regardless, read-only too. off: neither.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub boot_profile: BootProfileMode,

    /// Seconds after the guest's first read that a boot is recorded (time
    /// the guest waits on the remote does not count).
    #[arg(long, value_name = "SECS", default_value_t = 180)]
    pub boot_profile_window: u64,

    /// When a guest FLUSH returns. writeback: once the data is durable in
    /// the local cache (uploaded in the background, generations cut at
    /// FLUSH points); writethrough: once a generation holding it is
    /// committed on the remote (survives losing this machine); unsafe: at
    /// once, nothing made durable (throwaway sessions).
    #[arg(long = "cache", value_name = "MODE", default_value = "writeback")]
    pub cache_mode: CacheMode,

    /// In writeback mode, cut a generation at a guest FLUSH at most this
    /// often: how far the remote may lag behind the guest.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub sync_interval: u64,

    /// At stop, how long to wait for the last changes to be committed
    /// before exiting anyway (they stay in the cache and go up at the next
    /// start). A second SIGTERM/SIGINT skips the wait.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub sync_timeout: u64,

    /// What a guest request that needs the remote does when the remote
    /// fails or does not answer (like QEMU's rerror=). wait: retry within
    /// --remote-wait, then fail the request; eio: fail it at the first
    /// failed attempt. Cached data is served either way.
    #[arg(long, value_name = "POLICY", default_value = "wait")]
    pub on_remote_error: OnRemoteError,

    /// Most seconds a guest request waits on the remote before it fails.
    /// Keep it under the guest's disk timeout (Windows resets a disk whose
    /// request is held about 60 s; Linux's virtio-blk waits). At start, when
    /// the cache holds a copy of the volume, `serve` waits for the remote at
    /// most this or 15 s, whichever is less, then serves the copy.
    #[arg(long, value_name = "SECS", default_value_t = 45)]
    pub remote_wait: u64,
}

impl CacheArgs {
    /// The defaults, with `dir` as the cache directory.
    pub fn for_dir(dir: PathBuf) -> Self {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            c: CacheArgs,
        }
        let m = <Wrap as clap::CommandFactory>::command().get_matches_from(["driveblk"]);
        let mut c = Wrap::from_arg_matches(&m).expect("defaults parse").c;
        c.cache_dir = Some(dir);
        c
    }

    /// Cache options for the volume at `url`.
    pub fn options(&self, url: &str, read_only: bool, remote: &RemoteArgs) -> anyhow::Result<CacheOptions> {
        if self.fetch_concurrency == 0 || self.fetch_concurrency > 1024 {
            bail!("--fetch-concurrency must be between 1 and 1024");
        }
        let dir = match &self.cache_dir {
            Some(d) => d.clone(),
            None => default_cache_dir(url, &remote.options())?,
        };
        crate::remote::private::create_dir_all(&dir).map_err(|e| match e.raw_os_error() {
            Some(libc::EROFS) => {
                anyhow::anyhow!("cache directory {}: {}", dir.display(), crate::tier::ssd::on_read_only_mount(&dir))
            }
            _ => anyhow::Error::new(e).context(format!("cannot create cache directory {}", dir.display())),
        })?;
        let mut o = CacheOptions::new(dir);
        o.ram_cache = self.ram_cache;
        o.ssd_cache = self.ssd_cache;
        o.ssd_min_free = self.ssd_min_free;
        o.hydrate = self.hydrate;
        o.first_boot_whole_below = self.first_boot_whole_below;
        o.first_boot_ahead = crate::tier::tiered::FIRST_BOOT_AHEAD;
        o.encrypt_cache = self.encrypt_cache;
        o.fetch_concurrency = self.fetch_concurrency;
        o.readahead_chunks = self.readahead_chunks;
        o.boot_profile = self.boot_profile;
        if self.boot_profile_window == 0 {
            bail!("--boot-profile-window must be at least 1 second (use --boot-profile off to disable)");
        }
        o.boot_profile_window = Duration::from_secs(self.boot_profile_window);
        o.read_only = read_only;
        o.remote = remote.options();
        o.writeback.mode = self.cache_mode;
        if self.sync_interval == 0 {
            bail!("--sync-interval must be at least 1 second");
        }
        o.writeback.sync_interval = Duration::from_secs(self.sync_interval);
        if self.remote_wait == 0 {
            bail!("--remote-wait must be at least 1 second");
        }
        o.remote_wait = RemoteWait { on_error: self.on_remote_error, budget: Duration::from_secs(self.remote_wait) };
        if let Some(d) = &self.shared_cache {
            o.shared_cache = Some(
                crate::remote::SharedCache::open(d, self.shared_cache_max)
                    .with_context(|| format!("cannot use shared cache directory {}", d.display()))?,
            );
        }
        Ok(o)
    }
}

/// The default cache directory of the volume at `url` (see
/// [`cache_dir`](crate::cli::cache_dir)): keyed by the volume's id, found
/// from any spelling of its URL.
pub fn default_cache_dir(url: &str, remote: &crate::volume::RemoteOptions) -> anyhow::Result<PathBuf> {
    crate::cli::cache_dir::for_url(url, remote, true, Duration::from_secs(25))
}

/// Where the image's bytes come from.
// One per `serve`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ImageSource {
    File(PathBuf),
    Volume { url: String, cache: CacheOptions },
}

/// Validated settings for `serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub socket: PathBuf,
    pub source: ImageSource,
    /// None: the volume's recorded format.
    pub format: Option<ImageFormat>,
    pub device: DeviceConfig,
    pub metadata_cache: Option<u64>,
    /// At stop, how long to wait for the final sync.
    pub sync_timeout: Duration,
    /// How long a guest request may wait on the remote (`--remote-wait`):
    /// at stop, the requests in flight finish within twice that (a read,
    /// then a write-through flush).
    pub remote_wait: Duration,
    /// Control socket of a volume daemon.
    pub control_socket: PathBuf,
    pub socket_perms: SocketPerms,
    /// Prometheus endpoint address.
    pub metrics: Option<std::net::SocketAddr>,
    /// No --serial / --num-queues given: a volume's vm.toml supplies them.
    pub serial_from_vm: bool,
    pub queues_from_vm: bool,
}

const DEFAULT_SERIAL: &str = "driveblk";
const DEFAULT_QUEUES: u16 = 1;

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = anyhow::Error;

    fn try_from(a: ServeArgs) -> anyhow::Result<Self> {
        validate_device(&a)?;
        let source = match (a.image, a.volume) {
            (Some(image), None) => {
                if a.format.is_none() {
                    bail!("--format raw|qcow2 is required for --image (never guessed from the contents)");
                }
                ImageSource::File(image.canonicalize().with_context(|| format!("image {}", image.display()))?)
            }
            (None, Some(url)) => {
                let mut cache = a.cache.options(&url, a.read_only, &a.remote)?;
                if a.force_takeover {
                    cache.lease = tier_layer::LeaseMode::Force;
                }
                cache.ephemeral = a.ephemeral;
                ImageSource::Volume { url, cache }
            }
            _ => bail!("give exactly one of --image FILE or --volume URL"),
        };
        let socket_perms = SocketPerms::new(a.socket_group.as_deref(), a.socket_mode)?;
        Ok(ServeConfig {
            serial_from_vm: a.serial.is_none(),
            queues_from_vm: a.num_queues.is_none(),
            control_socket: a.control_socket.unwrap_or_else(|| control::default_path(&a.socket)),
            socket_perms,
            metrics: a.metrics,
            socket: a.socket,
            source,
            format: a.format,
            metadata_cache: a.metadata_cache,
            sync_timeout: Duration::from_secs(a.cache.sync_timeout),
            remote_wait: Duration::from_secs(a.cache.remote_wait),
            device: DeviceConfig {
                num_queues: a.num_queues.unwrap_or(DEFAULT_QUEUES),
                queue_size: a.queue_size,
                read_only: a.read_only,
                serial: a.serial.clone().unwrap_or_else(|| DEFAULT_SERIAL.into()).into_bytes(),
                io_threads: a.io_threads,
                poll_us: a.poll_us,
                queue_threads: a.queue_threads,
                // A read, then a write-through flush (see `remote_wait`).
                stop_drain: 2 * Duration::from_secs(a.cache.remote_wait) + Duration::from_secs(5),
            },
        })
    }
}

/// The checks of `serve`'s device options that need nothing opened (also
/// run by `driveblk config check`).
pub fn validate_device(a: &ServeArgs) -> anyhow::Result<()> {
    let queues = a.num_queues.unwrap_or(DEFAULT_QUEUES);
    if queues == 0 || queues > 64 {
        bail!("--num-queues must be between 1 and 64 (got {queues})");
    }
    if !a.queue_size.is_power_of_two() || !(2..=32768).contains(&a.queue_size) {
        bail!("--queue-size must be a power of two between 2 and 32768 (got {})", a.queue_size);
    }
    let serial = a.serial.as_deref().unwrap_or(DEFAULT_SERIAL);
    if serial.len() > ID_BYTES {
        bail!("--serial is {} bytes; at most {ID_BYTES} fit in a virtio-blk id", serial.len());
    }
    if a.poll_us > 1_000_000 {
        bail!("--poll-us must be at most 1000000 (one second)");
    }
    if !(1..=2).contains(&a.queue_threads) {
        bail!("--queue-threads must be 1 or 2 (got {})", a.queue_threads);
    }
    if a.io_threads == 0 || a.io_threads > 1024 {
        bail!("--io-threads must be between 1 and 1024 (got {})", a.io_threads);
    }
    if a.cache.sync_interval == 0 {
        bail!("--sync-interval must be at least 1 second");
    }
    if a.cache.boot_profile_window == 0 {
        bail!("--boot-profile-window must be at least 1 second (use --boot-profile off to disable)");
    }
    if a.cache.fetch_concurrency == 0 || a.cache.fetch_concurrency > 1024 {
        bail!("--fetch-concurrency must be between 1 and 1024");
    }
    Ok(())
}

/// The disk serial and queue count of the volume's VM (`vm.toml`), where
/// the command line gave none, so the guest sees the same disk on every
/// host. Read from the remote, and kept in the cache directory `cache_dir`
/// for a start while the remote is unreachable (an offline laptop must not
/// show its guest another disk serial, nor give QEMU fewer queues than
/// `qemu-args` asked for). A vm.toml that exists but cannot be used stops
/// the start.
fn vm_toml(cfg: &ServeConfig, store: &TieredStore, cache_dir: &Path) -> anyhow::Result<Option<VmSpec>> {
    if !(cfg.serial_from_vm || cfg.queues_from_vm) {
        return Ok(None);
    }
    let vol = store.volume();
    let way_out = "or give --serial and --num-queues";
    let remote = if vol.offline {
        None
    } else {
        match store.block_on(crate::volume::sidecar::read_from(&vol.remote, VM_FILE)) {
            Ok(got) => Some(got),
            Err(e) => {
                tracing::warn!(
                    "could not read the volume's {VM_FILE} ({e}): using the copy kept in the cache directory"
                );
                None
            }
        }
    };
    let (bytes, whence) = match remote {
        Some(Some(b)) => {
            if let Err(e) = vol.save_local(cache_dir, VM_FILE, &b) {
                tracing::warn!("could not keep a copy of the volume's {VM_FILE} in {}: {e}", cache_dir.display());
            }
            (b, format!("the volume's {VM_FILE}"))
        }
        Some(None) => {
            // Removed from the volume (or never made): no stale copy stays.
            match std::fs::remove_file(cache_dir.join(VM_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    bail!("cannot remove the stale copy {}: {e}", cache_dir.join(VM_FILE).display())
                }
                _ => return Ok(None),
            }
        }
        None => match vol.load_local(cache_dir, VM_FILE) {
            Ok(Some(b)) => (b, format!("the copy of the volume's {VM_FILE} in {}", cache_dir.display())),
            Ok(None) if vol.offline => {
                tracing::warn!(
                    "the remote is unreachable and the cache directory keeps no copy of the volume's {VM_FILE}: \
                     if it has one, stop and give --serial and --num-queues as it says, or the guest sees another disk"
                );
                return Ok(None);
            }
            Ok(None) => bail!(
                "could not read the volume's {VM_FILE} (see the warning above), and the cache directory keeps no \
                 copy of it: start again once the remote answers, {way_out}"
            ),
            Err(e) => bail!("cannot read the copy {}: {e}; {way_out}", cache_dir.join(VM_FILE).display()),
        },
    };
    let v = crate::cli::vm::parse(&String::from_utf8_lossy(&bytes))
        .with_context(|| format!("{whence} cannot be used: fix it (`driveblk vm init URL --force`), {way_out}"))?;
    Ok(Some(v))
}

/// The daemon serving from the cache directory `dir` right now, as its
/// status file names it ("driveblk pid N (control socket PATH)"), if that
/// process still runs here.
fn served_from(dir: &Path) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("status.json")).ok()?).ok()?;
    let pid = u32::try_from(v.get("pid")?.as_u64()?).ok()?;
    if v.get("running") != Some(&serde_json::Value::Bool(true)) || !crate::volume::lease::is_local_daemon(pid) {
        return None;
    }
    Some(match v.get("control_socket").and_then(|c| c.as_str()) {
        Some(c) => format!("driveblk pid {pid} (control socket {c})"),
        None => format!("driveblk pid {pid}"),
    })
}

/// The format to serve a volume as: `--format`, else the one recorded in
/// the volume at import.
fn volume_format(flag: Option<ImageFormat>, recorded: Option<&str>, url: &str) -> anyhow::Result<ImageFormat> {
    let recorded = match recorded {
        Some(r) => Some(r.parse::<ImageFormat>().map_err(|e| anyhow::anyhow!("volume {url}: {e}"))?),
        None => None,
    };
    match (flag, recorded) {
        (Some(f), Some(r)) if f != r => {
            tracing::warn!(url, "serving as {f} (--format) a volume recorded as {r}");
            Ok(f)
        }
        (Some(f), _) => Ok(f),
        (None, Some(r)) => Ok(r),
        (None, None) => {
            bail!("volume {url} does not record its image format (imported without --format): give --format raw|qcow2")
        }
    }
}

/// Warns when a file served as raw starts like an image of another format
/// or a compressed file: the guest would see that file, not its disk. Only
/// a warning: a guest may keep an image in its raw disk (`import` refuses).
fn warn_if_not_raw(file: &LocalFile) {
    use crate::format::probe::{probe, Probed, PROBE_BYTES};
    let mut head = vec![0u8; PROBE_BYTES.min(file.len() as usize)];
    if file.read_at(0, &mut head).is_err() {
        return;
    }
    let what = match probe(&head) {
        Probed::Qcow2 => "a qcow2 image (serve it with --format qcow2)".to_string(),
        Probed::Foreign { name, qemu_fmt } => {
            format!("a {name} image (convert it: `qemu-img convert -f {qemu_fmt} -O qcow2 IMAGE disk.qcow2`)")
        }
        Probed::Packed { name, unpack } => format!("a {name} file (unpack it: `{unpack}`)"),
        Probed::Unknown => return,
    };
    tracing::warn!(image = %file.path().display(), "served as raw, but the file is {what}: the guest sees that file, not the disk in it");
}

/// Opens the image's format over its storage.
fn open_format(
    storage: Arc<dyn Storage>,
    format: ImageFormat,
    cfg: &ServeConfig,
    backing: &dyn BackingOpener,
) -> anyhow::Result<Arc<dyn Disk>> {
    let read_only = cfg.device.read_only;
    Ok(match format {
        ImageFormat::Raw => Arc::new(RawDisk::new(storage, read_only)?),
        ImageFormat::Qcow2 => {
            let opts = Qcow2Options { read_only, metadata_cache_bytes: cfg.metadata_cache, ..Default::default() };
            Arc::new(Qcow2Disk::open(storage, opts, backing)?)
        }
    })
}

/// The status's `encryption` line: the volume's, and the SSD cache's
/// (an encrypted cache stays so without the flag, so the store says).
fn encryption_status(key_id: Option<&str>, cache_encrypted: bool) -> String {
    match (key_id, cache_encrypted) {
        (Some(id), true) => {
            format!("encrypted (AES-256-GCM, key id {id}); the local cache is encrypted too (AES-256-XTS)")
        }
        (Some(id), false) => format!("encrypted (AES-256-GCM, key id {id}); the local cache holds plaintext"),
        (None, _) => "none".to_string(),
    }
}

/// Runs `driveblk serve` until SIGTERM/SIGINT.
pub fn run(mut cfg: ServeConfig) -> anyhow::Result<()> {
    let notify = Notifier::from_env();
    // Sockets already in use end the start before a volume is opened (that
    // takes the writer lease on the remote).
    crate::vhost::socket_free(&cfg.socket)?;
    if matches!(cfg.source, ImageSource::Volume { .. }) {
        ControlServer::check_free(&cfg.control_socket)?;
    }
    // So is a metrics port another daemon serves on.
    let mut metrics_listener = match (cfg.metrics, &cfg.source) {
        (Some(addr), ImageSource::Volume { .. }) => Some(crate::cli::metrics::bind(addr)?),
        _ => None,
    };
    let read_only = cfg.device.read_only;
    let gc_plan = match &cfg.source {
        ImageSource::Volume { cache, .. } if !read_only && !cache.ephemeral => {
            background_gc_plan(cache.remote.clone())?
        }
        _ => None,
    };
    let mut status: Option<Arc<DaemonStatus>> = None;
    let mut volume_store: Option<Arc<TieredStore>> = None;
    let mut vm = None;
    let disk = match &cfg.source {
        ImageSource::File(path) => {
            notify.status(&format!("opening {}", path.display()));
            let file =
                LocalFile::open(path, read_only).with_context(|| format!("cannot open image {}", path.display()))?;
            file.lock(!read_only).with_context(|| {
                format!(
                    "image {} is in use by another process: stop the VM (or qemu-storage-daemon, driveblk) using \
                     it first",
                    path.display()
                )
            })?;
            let format = cfg.format.context("--format is required for --image")?;
            if format == ImageFormat::Raw {
                warn_if_not_raw(&file);
            }
            open_format(Arc::new(file), format, &cfg, &LocalBackingOpener::new(path))?
        }
        ImageSource::Volume { url, cache } => {
            notify.status(&format!("opening volume {url}"));
            let metrics = Arc::new(RemoteMetrics::default());
            let mut cache = cache.clone();
            cache.remote = cache.remote.clone().with_metrics(metrics.clone());
            let store: Arc<TieredStore> = match tier_layer::open_volume(url, cache.clone()) {
                Ok(s) => s,
                Err(e @ crate::volume::VolumeError::Cache { .. }) => match served_from(&cache.cache_dir) {
                    Some(who) => bail!(
                        "volume {url} is already served on this host: {who} serves it from cache directory {}. Use \
                         that daemon (`driveblk status {url}`, `driveblk sync {url}`), or stop it first: one cache \
                         directory serves one daemon at a time",
                        std::fs::canonicalize(&cache.cache_dir).unwrap_or_else(|_| cache.cache_dir.clone()).display()
                    ),
                    None => return Err(e.into()),
                },
                Err(e) => return Err(e.into()),
            };
            volume_store = Some(store.clone());
            crate::cli::host_ram::check_at_start(cache.ram_cache);
            // Are the newest generation's objects all in the folder? (People
            // trash and move files; a thread of its own, the guest waits not.)
            let weak = Arc::downgrade(&store);
            std::thread::Builder::new().name("driveblk-verify".into()).spawn(move || {
                if let Some(s) = weak.upgrade() {
                    crate::volume::verify::check_at_open_blocking(s.volume());
                }
            })?;
            vm = vm_toml(&cfg, &store, &cache.cache_dir)?;
            let mut st = DaemonStatus::new(store.clone(), metrics, url.clone());
            st.control_socket = Some(cfg.control_socket.clone());
            let leased = Arc::downgrade(&store);
            st.add_section(
                "lease",
                Box::new(move || {
                    // A lease lost to another host says so (and why), not
                    // that this host holds none.
                    leased
                        .upgrade()
                        .and_then(|s| match s.lease_lost() {
                            Some(why) => Some(serde_json::json!({ "lost": why })),
                            None => serde_json::to_value(s.lease()).ok(),
                        })
                        .unwrap_or(serde_json::Value::Null)
                }),
            );
            let enc =
                encryption_status(store.volume().key.as_ref().map(|k| k.key_id.as_str()), store.cache_encrypted());
            st.add_section("encryption", Box::new(move || serde_json::Value::String(enc.clone())));
            if let Some(c) = cache.shared_cache.clone() {
                st.add_section("shared_cache", Box::new(move || serde_json::to_value(c.stats()).unwrap_or_default()));
            }
            if cache.ephemeral {
                st.add_section(
                    "ephemeral",
                    Box::new(|| {
                        serde_json::Value::String(
                            "guest writes stay in this cache and are dropped at the next start".into(),
                        )
                    }),
                );
            }
            status = Some(Arc::new(st));
            if cache.hydrate {
                store.start_hydrate();
            }
            // Backing files of an image inside a volume would have to live in
            // the volume too; that is not supported yet.
            let format = volume_format(cfg.format, store.volume().header.image_format.as_deref(), url)?;
            open_format(store, format, &cfg, &NoBacking)
                .with_context(|| format!("cannot open volume {url} as {format}"))?
        }
    };
    if let Some(vm) = vm {
        if cfg.serial_from_vm {
            cfg.device.serial = vm.disk_serial.clone().into_bytes();
        }
        if cfg.queues_from_vm {
            cfg.device.num_queues = vm.num_queues;
        }
        tracing::info!(serial = %vm.disk_serial, queues = cfg.device.num_queues, "disk identity from the volume's vm.toml");
    }
    let what = disk.describe();
    tracing::info!(socket = %cfg.socket.display(), queues = cfg.device.num_queues, "serving {what}");
    // Signal handlers before any socket: whoever sees a socket up may
    // signal the daemon at once, and a SIGHUP must not end it then.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).context("cannot install signal handlers")?;
    // The control socket and status file come first: whoever sees the vhost
    // socket up can ask the daemon at once.
    let mut control = None;
    let mut status_file = None;
    let mut metrics_server = None;
    if cfg.metrics.is_some() && status.is_none() {
        tracing::warn!("--metrics is only served for --volume");
    }
    if let (Some(st), ImageSource::Volume { cache, .. }) = (&status, &cfg.source) {
        let (listener, path) = ControlServer::bind(&cfg.control_socket, &|p| cfg.socket_perms.apply(p))?;
        control = Some(ControlServer::start(listener, path, st.clone())?);
        if let Some(listener) = metrics_listener.take() {
            metrics_server = Some(MetricsServer::start(listener, st.clone())?);
        }
        // systemctl status shows what is pending, updated when it changes.
        let (tick_notify, last) = (notify.clone(), parking_lot::Mutex::new(String::new()));
        let tick = move |v: &serde_json::Value| {
            let line = crate::cli::status::summary(v);
            if *last.lock() != line {
                tick_notify.status(&line);
                *last.lock() = line;
            }
        };
        status_file =
            Some(StatusWriter::start(st.clone(), cache.cache_dir.join("status.json"), Duration::from_secs(1), tick)?);
    }
    if let Some(st) = &status {
        st.set_phase(Phase::Serving);
    }
    let perms = cfg.socket_perms.clone();
    let server = Server::bind_with(disk, cfg.device.clone(), &cfg.socket, &|p| {
        perms.apply(p).map_err(|e| std::io::Error::other(format!("{e:#}")))
    })?;
    let stop = server.stop_handle();
    if let Some(store) = &volume_store {
        // SIGUSR1 (older `driveblk sync`): cut a generation as soon as the
        // disk is consistent. A weak reference: the store must still close
        // when serving ends.
        let store = Arc::downgrade(store);
        let mut usr1 = Signals::new([signal_hook::consts::SIGUSR1]).context("cannot install signal handlers")?;
        std::thread::Builder::new().name("driveblk-sync-signal".into()).spawn(move || {
            for _ in usr1.forever() {
                let Some(store) = store.upgrade() else { return };
                tracing::info!("sync requested");
                store.request_sync();
            }
        })?;
    }
    if let (Some(store), ImageSource::Volume { url, .. }, Some(plan)) = (&volume_store, &cfg.source, gc_plan) {
        start_background_gc(store, url.clone(), plan)?;
    }
    // The vhost socket listens (connections queue in its backlog) and the
    // image is open: QEMU may start now.
    notify.ready(&format!("serving {what} on {}", cfg.socket.display()));
    let (sig_phase, sig_notify) = (status.as_ref().map(|s| s.phase_handle()), notify.clone());
    // The whole stop: the upload while the guest still runs, requests in
    // flight, then the final sync (which extends again from its own
    // start). The two uploads share one --sync-timeout.
    let stop_within = 2 * cfg.remote_wait + cfg.sync_timeout + Duration::from_secs(30);
    let upload_until: Arc<parking_lot::Mutex<Option<Instant>>> = Default::default();
    let (sig_store, sig_until, sync_timeout) =
        (volume_store.as_ref().map(Arc::downgrade), upload_until.clone(), cfg.sync_timeout);
    std::thread::Builder::new().name("driveblk-signals".into()).spawn(move || {
        // SIGHUP (a closed terminal, `systemctl kill -s HUP`) would end the
        // daemon without a flush and, under systemd, without a restart: a
        // guest's disk gone. Only SIGTERM and SIGINT stop it.
        let mut signals = signals.forever().filter(|&sig| {
            if sig == SIGHUP {
                tracing::info!("SIGHUP ignored: stop with SIGTERM; upload now with `driveblk sync`");
            }
            sig != SIGHUP
        });
        // Kept until the process ends.
        let mut _extended = None;
        if let Some(sig) = signals.next() {
            let first = if sig_store.is_some() {
                "stopping: uploading changes while the guest runs"
            } else {
                "stopping: finishing in-flight requests"
            };
            _extended = Some(sig_notify.stopping(first, stop_within));
            if let Some(p) = &sig_phase {
                p.set(Phase::Stopping);
            }
            *sig_until.lock() = Some(Instant::now() + sync_timeout);
            // On its own thread: this one waits for a second signal.
            let notify = sig_notify.clone();
            let until = sig_until.clone();
            let _ = std::thread::Builder::new().name("driveblk-stop".into()).spawn(move || {
                if let Some(store) = sig_store.as_ref().and_then(|w| w.upgrade()) {
                    if upload_before_letting_go(&store, sig, sync_timeout) == Upload::Hopeless {
                        // Nothing goes up: the final sync only gets its
                        // minimum, for the guest's last writes.
                        *until.lock() = Some(Instant::now());
                    }
                }
                tracing::info!(signal = sig, "shutting down: finishing in-flight requests");
                notify.status("stopping: finishing in-flight requests");
                stop.stop();
            });
        }
        // Closing uploads the last changes and maybe a boot profile, which
        // takes as long as the link needs; a second signal means the user
        // will not wait. Flushed writes are already durable in the cache
        // (uploaded at the next start), and the profile is only a speed-up.
        if let Some(sig) = signals.next() {
            tracing::warn!(
                signal = sig,
                "second signal: exiting now (changes not uploaded yet stay in the cache directory)"
            );
            std::process::exit(1);
        }
    })?;
    // Serving that ended in an error (a flush that failed at close) still
    // uploads what it can and finishes the lease: the error comes after.
    let served = server.run();
    if let Err(e) = &served {
        tracing::error!(error = %format!("{e:#}"), "serving ended with an error; the local changes are kept");
    }
    let mut diverged = None;
    if let Some(store) = &volume_store {
        if let Some(st) = &status {
            st.set_phase(Phase::FinalSync);
        }
        // The disk was flushed and closed: its last state goes up now.
        // systemd is told how long that may take, so it neither kills the
        // upload nor waits past --sync-timeout.
        let dirty = store.stats().dirty_bytes;
        // What the upload before the stop left of --sync-timeout, and at
        // least enough for the last writes' flush and cut.
        let timeout = match *upload_until.lock() {
            Some(until) => until.saturating_duration_since(Instant::now()).max(FINAL_SYNC_MIN.min(cfg.sync_timeout)),
            None => cfg.sync_timeout,
        };
        let _extend = notify.extend_timeout(timeout + Duration::from_secs(30));
        notify.status(&format!("final sync: uploading {} of changes", human(dirty)));
        let left = store.close(timeout);
        diverged = store.diverged().map(|c| crate::volume::VolumeError::Diverged {
            dir: store.cache_dir().to_path_buf(),
            reason: format!(
                "holds {} of changes the volume moved on without ({c}); the log above says how to keep them",
                human(left)
            ),
        });
        if left == 0 {
            if let Some(st) = store.sync_status().filter(|s| s.generations_committed > 0) {
                tracing::info!(
                    generation = store.volume().generation(),
                    committed = st.generations_committed,
                    "all changes are on the remote"
                );
            }
        }
    }
    if let Some(c) = control {
        c.stop();
    }
    drop(metrics_server);
    if let Some(s) = status_file {
        s.finish();
    }
    served?;
    if let Some(e) = diverged {
        notify.status("stopped: the local changes need a choice (fork, export or discard-local)");
        return Err(e.into());
    }
    notify.status("stopped");
    tracing::info!("stopped cleanly");
    Ok(())
}

/// How often `serve` runs gc on the volume it writes
/// (`DRIVEBLK_GC_EVERY`; `0` turns it off).
const GC_EVERY: Duration = Duration::from_secs(24 * 3600);

/// The first gc comes this soon after the start (a laptop's serve may
/// never run for a whole day).
const GC_FIRST: Duration = Duration::from_secs(3600);

/// When and how [`start_background_gc`] runs gc (`None`: never), read
/// from the environment before the volume is opened: a malformed
/// `DRIVEBLK_GC_*` stops the start, instead of each day's run ignoring it
/// and deleting what it was set to keep.
fn background_gc_plan(remote: crate::volume::RemoteOptions) -> anyhow::Result<Option<(Duration, GcOptions)>> {
    let every = match std::env::var("DRIVEBLK_GC_EVERY") {
        Ok(v) => crate::cli::maintain::parse_duration(&v)
            .map_err(anyhow::Error::msg)
            .context("invalid DRIVEBLK_GC_EVERY=VALUE: a duration such as 24h, or 0 for never")?,
        Err(_) => GC_EVERY,
    };
    if every.is_zero() {
        return Ok(None);
    }
    let mut opts = crate::cli::maintain::RetentionArgs { keep_generations: None, keep_days: None, grace: None }
        .options_with(remote)
        .context("serve's daily gc of the volume (DRIVEBLK_GC_EVERY=0 turns it off)")?;
    opts.repack_dead_share = f64::INFINITY;
    opts.max_packs = usize::MAX;
    Ok(Some((every, opts)))
}

/// gc is the only thing that deletes, and nothing else would run it: while
/// this daemon holds the writer lease, a delete-only gc (default retention
/// and grace, or `DRIVEBLK_GC_*`; no repack, which would commit a
/// generation over this writer's) runs about once a day. gc is safe
/// against a concurrent writer (`volume::gc`): the packs of a commit under
/// way are named for a generation newer than any gc sees, and spared.
fn start_background_gc(
    store: &Arc<TieredStore>,
    url: String,
    (every, opts): (Duration, GcOptions),
) -> anyhow::Result<()> {
    let store = Arc::downgrade(store);
    std::thread::Builder::new().name("driveblk-gc".into()).spawn(move || {
        let mut wait = every.min(GC_FIRST);
        loop {
            std::thread::sleep(wait);
            wait = every;
            // Gone: serving ended. No lease: another host writes (or a
            // read-only start); its gc is its own.
            match store.upgrade() {
                None => return,
                Some(s) if s.lease().is_none() => continue,
                Some(_) => {}
            }
            match crate::volume::gc::gc(&url, &opts) {
                Ok(r) => tracing::info!(
                    deleted = r.deleted.len() + r.scratch.len(),
                    freed = %human(r.bytes_before.saturating_sub(r.bytes_after)),
                    kept_generations = r.kept.len(),
                    "gc: deleted what no kept generation needs (again in {} s)",
                    every.as_secs()
                ),
                Err(e) => tracing::warn!(
                    error = %format!("{e:#}"),
                    "gc did not run (again in {} s; `driveblk gc {url}` by hand says the same)",
                    every.as_secs()
                ),
            }
        }
    })?;
    Ok(())
}

/// The final sync's share of --sync-timeout when the upload before the
/// stop used it all: the guest's last writes still get a flush and a cut.
const FINAL_SYNC_MIN: Duration = Duration::from_secs(10);

/// How long the upload before the stop waits for the guest's next FLUSH
/// to make a cut possible, counted from the signal or from the last
/// commit, whichever is later (a guest that never flushes would otherwise
/// hold the stop for all of --sync-timeout; a cut uploading at the signal
/// may take far longer than this, and the guest's next FLUSH cuts only
/// once it is committed).
const CUT_WAIT: Duration = Duration::from_secs(30);

/// At a stop, uploads what the guest has flushed while it keeps running,
/// so the guest's disk pauses (for a restart under a running VM) only for
/// the final sync of what it wrote meanwhile, not for the whole upload:
/// on a 10 Mbit/s uplink a GiB of changes takes 15 minutes. Ends early on
/// a paused or conflicted write-back, when nothing reaches the remote for
/// --remote-wait, when no cut comes within [`CUT_WAIT`] of the last
/// commit, or at a second signal (which exits at once, as it does during
/// the final sync).
fn upload_before_letting_go(store: &TieredStore, sig: i32, timeout: Duration) -> Upload {
    let Some(before) = store.sync_status() else { return Upload::Done };
    let dirty = store.stats().dirty_bytes;
    if before.paused || before.conflict.is_some() {
        return Upload::Hopeless;
    }
    if dirty == 0 || timeout.is_zero() {
        return Upload::Done;
    }
    tracing::info!(signal = sig, dirty = %human(dirty), "stopping: uploading the flushed changes while the guest runs");
    let t0 = Instant::now();
    let mut watch = store.upload_watch();
    let mut hopeless = false;
    // Since when no cut is uploading or waiting for a retry: the guest's
    // next FLUSH is awaited from then.
    let (mut idle_since, mut seen) = (t0, (before.last_cut, before.committed_cut));
    let r = crate::cli::control::wait_synced(store, timeout, || {
        let y = store.sync_status().unwrap_or_default();
        if let Some(why) = watch.hopeless(&y) {
            hopeless = true;
            anyhow::bail!("{why}");
        }
        let now = (y.last_cut, y.committed_cut);
        if y.uploading || y.last_cut > y.committed_cut || now != seen {
            (idle_since, seen) = (Instant::now(), now);
        }
        if idle_since.elapsed() >= CUT_WAIT {
            anyhow::bail!("the guest did not flush within {} s", CUT_WAIT.as_secs());
        }
        Ok(())
    });
    match r {
        Ok(_) => {
            tracing::info!(seconds = t0.elapsed().as_secs_f64(), "stopping: the flushed changes are on the remote");
            Upload::Done
        }
        Err(e) => {
            tracing::info!(reason = %format!("{e:#}"), "stopping: the final sync takes what is left");
            if hopeless {
                Upload::Hopeless
            } else {
                Upload::Left
            }
        }
    }
}

/// How the upload before the stop ended.
#[derive(Debug, PartialEq, Eq)]
enum Upload {
    /// Nothing (more) to upload while the guest runs.
    Done,
    /// Cut short (time, or no FLUSH from the guest): the final sync goes on.
    Left,
    /// Nothing can go up now (write-back paused or in conflict, the
    /// network gone).
    Hopeless,
}
