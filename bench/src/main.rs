//! driveblk-bench: a vhost-user-blk load generator built on libblkio's virtio-blk-vhost-user
//! driver, an independent client implementation, so driveblk and qemu-storage-daemon are
//! measured through exactly the same code path.

mod bound;
mod engine;
mod floor;
mod hist;
mod syncfloor;
mod verify;
mod workload;

use anyhow::{bail, ensure, Context, Result};
use blkio::Blkio;
use clap::Parser;
use engine::{DataMode, Job, Outcome, VerifyMode, Window};
use hist::Histogram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use verify::Bitmap;
use workload::{BootParams, Req, Rw, Source};

#[derive(Parser, Debug)]
#[command(version, about = "vhost-user-blk load generator (libblkio client)")]
struct Args {
    /// vhost-user-blk unix socket of the daemon under test.
    #[arg(long, required_unless_present_any = ["bound", "copy_floor", "sync_floor"])]
    socket: Option<PathBuf>,
    /// Number of virtqueues, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    #[arg(long, value_enum, default_value = "randread")]
    rw: Rw,
    /// Block size, e.g. 4k, 64k, 1m.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests in flight per queue (synthetic patterns; default 32), or in total across all
    /// queues for --pattern boot (default 8).
    #[arg(long)]
    iodepth: Option<usize>,
    /// Measured seconds (after --warmup). Default 10 unless --ios is given.
    #[arg(long)]
    runtime: Option<f64>,
    /// Measure exactly this many requests (after warmup), split evenly across queues.
    #[arg(long)]
    ios: Option<u64>,
    /// Bytes of the device to use, from offset 0. Default: the whole capacity.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Unmeasured seconds before measuring starts.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    rwmixread: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// After a writing workload, read back every written block and compare it with the pattern.
    #[arg(long)]
    verify: bool,
    /// Write buffer contents: reuse (filled once), random (fresh, incompressible, per write),
    /// compressible (fresh per write, each 4 KiB half random, half zeroes). Not with --verify.
    #[arg(long, value_enum, default_value = "reuse")]
    data: DataMode,
    /// Sequential patterns (read, write): request i goes to the i-th STRIDE-sized slot of the
    /// range, at a random --bs-aligned place in it (e.g. --bs 4k --stride 1m: one write per MiB).
    #[arg(long, value_parser = parse_size)]
    stride: Option<u64>,
    /// After every N completed writes, send a FLUSH; that write's latency runs until the FLUSH
    /// completes (--iodepth 1 --flush-every 1: write+FLUSH latency, like fio --fsync=1).
    #[arg(long, default_value_t = 0)]
    flush_every: u64,
    /// Replay a generated trace instead of a synthetic pattern.
    #[arg(long, value_enum)]
    pattern: Option<Pattern>,
    /// Boot trace: number of reads.
    #[arg(long, default_value_t = 60_000)]
    trace_reads: u64,
    /// Boot trace: approximate total bytes read.
    #[arg(long, default_value = "600m", value_parser = parse_size)]
    trace_bytes: u64,
    /// Boot trace: files are placed in the first N percent of the range.
    #[arg(long, default_value_t = 60.0)]
    trace_span_pct: f64,
    /// Boot trace: a boot that differs from the seed's — this share of its files replaced by
    /// others and as many moved in the read order (e.g. 0.1: the "10%-different boot").
    #[arg(long, default_value_t = 0.0)]
    trace_differ: f64,
    /// Boot trace: connect to nothing; print what an ideal daemon would reach on this trace
    /// (`--size` is the device's bytes; `--trace-differ` > 0 replays against the seed boot's
    /// profile, 0 is a first boot) over a link of --bound-rtt-ms per request and --bound-mbit,
    /// with the profile (or the image) local from the start and streamed beside the misses.
    #[arg(long, requires = "size")]
    bound: bool,
    #[arg(long, default_value_t = 100.0)]
    bound_rtt_ms: f64,
    #[arg(long, default_value_t = 200.0)]
    bound_mbit: f64,
    /// Connect to nothing; time what one 4 KiB read costs this machine's memory at the least:
    /// random copies from an anonymous region of --size (default 2g) with 4 KiB and 2 MiB pages,
    /// --ios of them (default 3,000,000), and from --copy-floor-file when given (pread, and
    /// copies from a mapping). The floor under the RAM-warm and SSD-warm rows.
    #[arg(long)]
    copy_floor: bool,
    #[arg(long, requires = "copy_floor")]
    copy_floor_file: Option<PathBuf>,
    /// Connect to nothing; time what making one 4 KiB write durable costs the disk under DIR
    /// at the least, --ios times (default 2,000) for each order of syncs a write-back cache
    /// can choose (data only; a journal record's sync, then the data's; both at once; one
    /// file; the record by RWF_DSYNC). The floor under the QD1 write+FLUSH row.
    #[arg(long, value_name = "DIR")]
    sync_floor: Option<PathBuf>,
    /// Virtqueue size (power of two). libblkio uses 3 descriptors per request (no indirect
    /// descriptors), so the default 256 holds 85 requests; larger iodepths wait in its backlog.
    #[arg(long)]
    queue_size: Option<i32>,
    /// Keep retrying the connection this long (the daemon may still be starting).
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// A request not completing within this many seconds is an error.
    #[arg(long, default_value_t = 30.0)]
    io_timeout: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Pattern {
    /// Windows-10-boot-like read working set (see --trace-*).
    Boot,
}

/// Parses "4096", "4k", "64K", "1m", "2g", "4KiB": binary multiples.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("ib").or_else(|| t.strip_suffix('b')).unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?} (want e.g. 4096, 4k, 64k, 1m)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} overflows"))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("driveblk-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Connects, retrying while the daemon's socket is not accepting yet.
fn connect(args: &Args, read_only: bool) -> Result<Blkio> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.connect_timeout);
    let socket = args.socket.as_ref().context("--socket is needed")?;
    let path = socket.to_str().context("socket path is not UTF-8")?;
    loop {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", path)?;
        // Read-only workloads declare it, so they also work against read-only exports (libblkio
        // refuses to start a writable client on a device that offers VIRTIO_BLK_F_RO).
        b.set_bool("read-only", read_only)?;
        match b.connect() {
            Ok(()) => return Ok(b),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => bail!("connecting to {}: {e}", socket.display()),
        }
    }
}

struct Plan {
    /// Per queue: the request source and its depth.
    sources: Vec<(Source, usize)>,
    /// Largest request, i.e. the size of one buffer slot.
    slot_len: usize,
    warmup: Duration,
    runtime: Option<Duration>,
    quota: Option<u64>,
    label: String,
}

fn synthetic_plan(args: &Args, range: u64) -> Result<Plan> {
    let bs = args.bs;
    ensure!(bs >= 512 && bs % 512 == 0, "--bs must be a positive multiple of 512");
    ensure!(bs <= u32::MAX as u64 / 2, "--bs is too large");
    let iodepth = args.iodepth.unwrap_or(32);
    let n = args.queues as u64;
    let sequential = matches!(args.rw, Rw::Read | Rw::Write);
    // Sequential streams get disjoint stripes (like fio jobs with offset_increment) so queues
    // don't read the same blocks; random queues share the whole range with different seeds.
    let stride = args.stride.unwrap_or(0);
    if stride > 0 {
        ensure!(sequential, "--stride needs a sequential pattern (--rw read or write)");
        ensure!(stride >= bs && stride % bs == 0, "--stride must be a multiple of --bs");
    }
    let unit = if stride > 0 { stride } else { bs };
    let stripe = if sequential { range / n / unit * unit } else { range / bs * bs };
    ensure!(stripe >= unit, "--size {range} is too small for --bs {bs} (or --stride) across {n} queues");
    let sources = (0..n)
        .map(|i| {
            let source = Source::Synthetic {
                rw: args.rw,
                rng: workload::Rng::new(workload::mix(args.seed.wrapping_add(i))),
                bs,
                base: if sequential { i * stripe } else { 0 },
                len: stripe,
                pos: 0,
                read_pct: args.rwmixread,
                stride,
            };
            (source, iodepth)
        })
        .collect();
    let quota = args.ios;
    if let Some(ios) = quota {
        ensure!(ios >= n, "--ios must be at least --queues");
    }
    let runtime = match (args.runtime, quota) {
        (Some(r), _) => Some(r),
        (None, Some(_)) => None,
        (None, None) => Some(10.0),
    };
    ensure!(runtime.is_none_or(|r| r > 0.0), "--runtime must be positive");
    Ok(Plan {
        sources,
        slot_len: bs as usize,
        warmup: Duration::from_secs_f64(args.warmup),
        runtime: runtime.map(Duration::from_secs_f64),
        // Split the quota per queue; the first queues take the remainder.
        quota,
        label: format!("{:?}", args.rw).to_lowercase(),
    })
}

fn boot_params(args: &Args, range: u64) -> Result<BootParams> {
    ensure!(args.trace_span_pct > 0.0 && args.trace_span_pct <= 100.0, "--trace-span-pct must be in (0, 100]");
    let span = (range as f64 * args.trace_span_pct / 100.0) as u64 / 4096 * 4096;
    ensure!(span >= 1 << 20, "the boot trace needs a span of at least 1 MiB");
    Ok(BootParams {
        reads: args.trace_reads,
        bytes: args.trace_bytes,
        span,
        seed: args.seed,
        differ: args.trace_differ,
    })
}

fn boot_plan(args: &Args, range: u64) -> Result<Plan> {
    let reqs = workload::boot_trace(&boot_params(args, range)?);
    let total_qd = args.iodepth.unwrap_or(8);
    let n = args.queues;
    ensure!(total_qd >= n, "--iodepth (total for --pattern boot) must be at least --queues");
    let (reqs, next) = (Arc::new(reqs), Arc::new(AtomicUsize::new(0)));
    let sources = (0..n)
        .map(|i| {
            let depth = total_qd / n + usize::from(i < total_qd % n);
            (Source::List { reqs: reqs.clone(), next: next.clone() }, depth)
        })
        .collect();
    Ok(Plan { sources, slot_len: 32 << 10, warmup: Duration::ZERO, runtime: None, quota: None, label: "boot".into() })
}

/// `--bound`: the ideal daemon's figures for this trace, per size of the piece a miss fetches.
fn print_bound(args: &Args) -> Result<()> {
    let range = args.size.context("--bound needs --size")?;
    let params = boot_params(args, range)?;
    let rate = args.bound_mbit * 125_000.0;
    let profiled = args.trace_differ > 0.0;
    let qd = args.iodepth.unwrap_or(8);
    let read: u64 = workload::boot_trace(&params).iter().map(|r| u64::from(r.len)).sum();
    let floor = read as f64 / rate;
    println!(
        "{} of {} MB read at QD{qd}, {} ms per request, {} Mbit/s: bandwidth floor {floor:.1} s",
        if profiled { "a boot against the seed boot's profile" } else { "a first boot (nothing local)" },
        read / 1_000_000,
        args.bound_rtt_ms,
        args.bound_mbit
    );
    println!("| piece a miss fetches | round trips | wall from round trips, s | MB moved (profile + misses) | link time for them, s | lower bound / floor |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for unit in [64u64 << 10, 128 << 10, 256 << 10, 1 << 20] {
        let b = bound::ideal(&params, profiled, unit, args.bound_rtt_ms / 1000.0, qd);
        let moved = b.profile_bytes + b.miss_bytes;
        let link = moved as f64 / rate;
        println!(
            "| {} KiB | {} | {:.1} | {} + {} | {link:.1} | {:.2} |",
            b.unit >> 10,
            b.fetches,
            b.latency_s,
            b.profile_bytes / 1_000_000,
            b.miss_bytes / 1_000_000,
            b.latency_s.max(link) / floor
        );
    }
    let streamed = |unit: u64, policy: bound::Policy| {
        bound::streamed(&params, profiled, unit, args.bound_rtt_ms / 1000.0, rate, qd, policy)
    };
    println!();
    println!(
        "With a stream beside the misses ({}), misses ahead of it on the link:",
        if profiled { "the profile, in the recorded boot's order" } else { "the image, front to back" }
    );
    println!("| piece a miss fetches | wall s | round trips | MB misses moved | MB streamed | wall / floor |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for unit in [64u64 << 10, 128 << 10, 256 << 10, 1 << 20] {
        let b = streamed(unit, bound::Policy::default());
        println!(
            "| {} KiB | {:.1} | {} | {} | {} | {:.2} |",
            b.unit >> 10,
            b.wall_s,
            b.fetches,
            b.miss_bytes / 1_000_000,
            b.stream_bytes / 1_000_000,
            b.wall_s / floor
        );
    }
    if !profiled {
        return Ok(());
    }
    println!();
    println!("The same, with a stream that follows the guest (a miss on a profiled page moves the stream on from there) or read-ahead of the pages no profile holds (a read that continues a recent one fetches twice the run ahead, up to the size given):");
    println!("| piece a miss fetches | stream follows | read-ahead up to | wall s | requests | MB misses + read-ahead moved (of it read-ahead) | MB streamed | wall / floor |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for unit in [64u64 << 10, 256 << 10] {
        for (follow, read_ahead) in [(true, 0), (false, 256u64 << 10), (false, 1 << 20), (true, 1 << 20)] {
            let b = streamed(unit, bound::Policy { follow, read_ahead, profile_local: false });
            println!(
                "| {} KiB | {} | {} | {:.1} | {} | {} ({}) | {} | {:.2} |",
                unit >> 10,
                if follow { "yes" } else { "no" },
                if read_ahead == 0 { "none".to_string() } else { format!("{} KiB", read_ahead >> 10) },
                b.wall_s,
                b.fetches,
                b.miss_bytes / 1_000_000,
                b.read_ahead_bytes / 1_000_000,
                b.stream_bytes / 1_000_000,
                b.wall_s / floor
            );
        }
    }
    println!();
    println!("With the profile local before the boot (`serve` started ahead of the guest): the link carries only the misses and read-ahead:");
    println!("| piece a miss fetches | read-ahead up to | wall s | requests | MB misses + read-ahead moved (of it read-ahead) | wall / floor |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for unit in [64u64 << 10, 256 << 10] {
        for read_ahead in [0u64, 256 << 10, 1 << 20, 4 << 20] {
            let b = streamed(unit, bound::Policy { follow: false, read_ahead, profile_local: true });
            println!(
                "| {} KiB | {} | {:.1} | {} | {} ({}) | {:.2} |",
                unit >> 10,
                if read_ahead == 0 { "none".to_string() } else { format!("{} KiB", read_ahead >> 10) },
                b.wall_s,
                b.fetches,
                b.miss_bytes / 1_000_000,
                b.read_ahead_bytes / 1_000_000,
                b.wall_s / floor
            );
        }
    }
    Ok(())
}

fn run(args: &Args) -> Result<()> {
    if let Some(dir) = &args.sync_floor {
        return syncfloor::run(dir, args.ios.unwrap_or(2_000));
    }
    if args.copy_floor {
        return floor::run(
            args.size.unwrap_or(2 << 30),
            args.ios.unwrap_or(3_000_000),
            args.copy_floor_file.as_deref(),
        );
    }
    ensure!(args.queues >= 1, "--queues must be at least 1");
    let boot = args.pattern == Some(Pattern::Boot);
    if boot {
        ensure!(
            args.runtime.is_none() && args.ios.is_none() && args.warmup == 0.0,
            "--pattern boot always replays the whole trace once, cold; scale it with \
             --trace-reads/--trace-bytes instead of --runtime/--ios/--warmup"
        );
        ensure!(!args.verify, "--verify needs a writing workload, and the boot trace only reads");
    }
    ensure!(!args.verify || args.rw.writes(), "--verify needs --rw write, randwrite or randrw");
    ensure!(!args.verify || args.data == DataMode::Reuse, "--verify writes its own pattern: no --data with it");
    ensure!(args.flush_every == 0 || (!boot && args.rw.writes()), "--flush-every needs a writing workload");
    ensure!(args.warmup >= 0.0, "--warmup must not be negative");
    let writes = !boot && args.rw.writes();
    if args.bound {
        ensure!(boot, "--bound needs --pattern boot");
        return print_bound(args);
    }

    let mut blkio = connect(args, !writes)?;
    let capacity = blkio.get_u64("capacity")?;
    let max_queues = blkio.get_i32("max-queues")?;
    let req_align = blkio.get_i32("request-alignment")? as u64;
    let max_transfer = blkio.get_i32("max-transfer")? as u64;
    ensure!(
        args.queues as i32 <= max_queues,
        "--queues {} but the device offers at most {max_queues} queues",
        args.queues
    );
    let range = args.size.unwrap_or(capacity);
    ensure!(range <= capacity, "--size {range} exceeds the device capacity {capacity}");

    let mut plan = if boot { boot_plan(args, range)? } else { synthetic_plan(args, range)? };
    ensure!(
        plan.slot_len as u64 % req_align == 0,
        "request size {} is not a multiple of the device's request alignment {req_align}",
        plan.slot_len
    );
    ensure!(
        max_transfer == 0 || plan.slot_len as u64 <= max_transfer,
        "requests of {} bytes exceed the device's max transfer {max_transfer}",
        plan.slot_len
    );

    blkio.set_i32("num-queues", args.queues as i32)?;
    if let Some(qs) = args.queue_size {
        blkio.set_i32("queue-size", qs)?;
    }
    let queues = blkio.start().context("starting the device")?.queues;

    // vhost-user hands the daemon our buffers by fd, so they must come from libblkio's
    // memfd-backed regions; and libblkio only maps a region once the device is started.
    let depths: Vec<usize> = plan.sources.iter().map(|s| s.1).collect();
    let align = blkio.get_u64("mem-region-alignment")?.max(4096) as usize;
    let region_len = (depths.iter().sum::<usize>() * plan.slot_len).div_ceil(align) * align;
    let region = blkio.alloc_mem_region(region_len)?;
    blkio.map_mem_region(&region)?;
    // Non-zero, non-repeating content so no layer can shortcut zero pages on writes.
    // SAFETY: the region is ours, mapped read/write, and no request is in flight yet.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    verify::fill(mem, 0, args.seed ^ 0x5eed);
    let bases: Vec<usize> = depths
        .iter()
        .scan(region.addr, |a, &d| {
            let base = *a;
            *a += d * plan.slot_len;
            Some(base)
        })
        .collect();

    // A per-run nonce in the pattern, so blocks left by an earlier run cannot verify.
    let tag = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_nanos() as u64 ^ args.seed.rotate_left(32);
    let stop = Arc::new(AtomicBool::new(false));
    let io_timeout = Duration::from_secs_f64(args.io_timeout);
    let n = depths.len() as u64;
    // Windows are fixed just before the threads start so that connection and setup time never
    // count as warmup or measurement.
    let start = Instant::now();
    let cpu_start = own_cpu_secs();
    let warm_until = start + plan.warmup;
    let end = plan.runtime.map(|r| warm_until + r);
    let jobs: Vec<Job> = queues
        .into_iter()
        .zip(std::mem::take(&mut plan.sources))
        .zip(&bases)
        .enumerate()
        .map(|(index, ((q, (source, iodepth)), &buf_base))| Job {
            index,
            q,
            buf_base,
            slot_len: plan.slot_len,
            iodepth,
            source,
            window: Window {
                warm_until,
                end,
                // Split the quota; the first queues take the remainder.
                quota: plan.quota.map(|t| t / n + u64::from((index as u64) < t % n)),
            },
            verify: if args.verify {
                VerifyMode::Write { tag, written: Bitmap::new(range, args.bs) }
            } else {
                VerifyMode::Off
            },
            stop: stop.clone(),
            io_timeout,
            data: args.data,
            data_rng: workload::Rng::new(workload::mix(args.seed ^ 0xda7a ^ ((index as u64) << 32) ^ tag)),
            flush_every: args.flush_every,
        })
        .collect();
    let (queues, outcomes) = run_jobs(jobs)?;
    let mut report = Report::new(&plan, &outcomes);
    report.gen_cpu_pct =
        cpu_start.zip(own_cpu_secs()).map(|(a, b)| 100.0 * (b - a) / start.elapsed().as_secs_f64().max(1e-9));

    if args.verify {
        let mut written = Bitmap::new(range, args.bs);
        for o in &outcomes {
            written.merge(o.written.as_ref().expect("verify write bitmap"));
        }
        let reqs: Vec<Req> =
            written.offsets().map(|offset| Req { write: false, offset, len: args.bs as u32 }).collect();
        let count = reqs.len() as u64;
        let (reqs, next) = (Arc::new(reqs), Arc::new(AtomicUsize::new(0)));
        let now = Instant::now();
        let jobs: Vec<Job> = queues
            .into_iter()
            .zip(&bases)
            .enumerate()
            .map(|(index, (q, &buf_base))| Job {
                index,
                q,
                buf_base,
                slot_len: plan.slot_len,
                iodepth: depths[index],
                source: Source::List { reqs: reqs.clone(), next: next.clone() },
                window: Window { warm_until: now, end: None, quota: None },
                verify: VerifyMode::Check { tag },
                stop: stop.clone(),
                io_timeout,
                data: DataMode::Reuse,
                data_rng: workload::Rng::new(0),
                flush_every: 0,
            })
            .collect();
        let (_, outcomes) = run_jobs(jobs).context("verify read-back")?;
        let verified: u64 = outcomes.iter().map(|o| o.verified).sum();
        ensure!(verified == count, "verify read back {verified} of {count} written blocks");
        report.verified_blocks = Some(verified);
    }

    if args.json {
        println!("{}", report.json(args));
    } else {
        report.print(args);
    }
    Ok(())
}

/// Runs one thread per job and collects their results; the first failure wins.
fn run_jobs(jobs: Vec<Job>) -> Result<(Vec<blkio::Blkioq>, Vec<Outcome>)> {
    let handles: Vec<_> = jobs.into_iter().map(|j| std::thread::spawn(move || engine::run(j))).collect();
    let mut queues = Vec::new();
    let mut outcomes = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h.join().map_err(|_| anyhow::anyhow!("queue thread panicked")).and_then(|r| r) {
            Ok((q, o)) => {
                queues.push(q);
                outcomes.push(o);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok((queues, outcomes)),
    }
}

struct Report {
    label: String,
    elapsed: Duration,
    ops: u64,
    bytes: u64,
    reads: u64,
    writes: u64,
    hist: Histogram,
    verified_blocks: Option<u64>,
    flushes: u64,
    /// The generator's own CPU use (all threads, % of one core) over the run: if this nears
    /// 100 × queues, the generator rather than the daemon may be the limit.
    gen_cpu_pct: Option<f64>,
}

/// utime + stime of this process in seconds, from /proc/self/stat. Fields are counted after the
/// ")" closing the command name; USER_HZ is 100 on every Linux ABI that exposes it this way.
fn own_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

impl Report {
    /// Time-bounded runs divide by the fixed window; count-bounded runs (and traces) by the span
    /// from the first measured submission to the last measured completion.
    fn new(plan: &Plan, outcomes: &[Outcome]) -> Self {
        let mut hist = Histogram::new();
        for o in outcomes {
            hist.merge(&o.hist);
        }
        let elapsed = match (plan.runtime, plan.quota) {
            (Some(r), None) => r,
            _ => {
                let first = outcomes.iter().filter_map(|o| o.first_submit).min();
                let last = outcomes.iter().filter_map(|o| o.last_complete).max();
                match (first, last) {
                    (Some(f), Some(l)) => l - f,
                    _ => Duration::ZERO,
                }
            }
        };
        Report {
            label: plan.label.clone(),
            elapsed,
            ops: outcomes.iter().map(|o| o.ops).sum(),
            bytes: outcomes.iter().map(|o| o.bytes).sum(),
            reads: outcomes.iter().map(|o| o.reads).sum(),
            writes: outcomes.iter().map(|o| o.writes).sum(),
            flushes: outcomes.iter().map(|o| o.flushes).sum(),
            hist,
            verified_blocks: None,
            gen_cpu_pct: None,
        }
    }

    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64().max(1e-9)
    }

    fn iops(&self) -> f64 {
        self.ops as f64 / self.secs()
    }

    /// Decimal megabytes per second (10^6 bytes), as fio's "MB/s".
    fn mbps(&self) -> f64 {
        self.bytes as f64 / self.secs() / 1e6
    }

    fn us(&self, q: f64) -> f64 {
        self.hist.quantile(q) as f64 / 1000.0
    }

    fn print(&self, args: &Args) {
        println!(
            "{} bs={} queues={} elapsed={:.3}s",
            self.label,
            if self.label == "boot" { "4k-32k".into() } else { args.bs.to_string() },
            args.queues,
            self.secs()
        );
        println!(
            "  ops {} (reads {}, writes {})  iops {:.0}  bw {:.1} MB/s  ({} bytes)",
            self.ops,
            self.reads,
            self.writes,
            self.iops(),
            self.mbps(),
            self.bytes
        );
        println!(
            "  lat us: mean {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            self.hist.mean() / 1000.0,
            self.us(0.5),
            self.us(0.9),
            self.us(0.99),
            self.us(0.999),
            self.hist.max() as f64 / 1000.0
        );
        if self.flushes > 0 {
            println!("  flushes {} (a write's latency includes the FLUSH after it)", self.flushes);
        }
        if let Some(c) = self.gen_cpu_pct {
            println!("  generator CPU {c:.0}% of one core");
        }
        if let Some(v) = self.verified_blocks {
            println!("  verify: {v} written blocks read back and matched");
        }
    }

    fn json(&self, args: &Args) -> String {
        format!(
            concat!(
                "{{\"workload\":\"{}\",\"bs\":{},\"queues\":{},\"elapsed_s\":{:.6},\"ops\":{},",
                "\"reads\":{},\"writes\":{},\"flushes\":{},\"bytes\":{},\"iops\":{:.1},\"mbps\":{:.3},",
                "\"lat_us\":{{\"mean\":{:.2},\"p50\":{:.2},\"p90\":{:.2},\"p99\":{:.2},",
                "\"p999\":{:.2},\"max\":{:.2}}},\"errors\":0,\"verified_blocks\":{},\"gen_cpu_pct\":{}}}"
            ),
            self.label,
            // The boot trace mixes 4-32 KiB requests: no single block size.
            if self.label == "boot" { "null".to_string() } else { args.bs.to_string() },
            args.queues,
            self.secs(),
            self.ops,
            self.reads,
            self.writes,
            self.flushes,
            self.bytes,
            self.iops(),
            self.mbps(),
            self.hist.mean() / 1000.0,
            self.us(0.5),
            self.us(0.9),
            self.us(0.99),
            self.us(0.999),
            self.hist.max() as f64 / 1000.0,
            self.verified_blocks.map_or("null".into(), |v| v.to_string()),
            self.gen_cpu_pct.map_or("null".into(), |c| format!("{c:.1}")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("600m"), Ok(600 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("x").is_err());
    }
}
