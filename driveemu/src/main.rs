//! The `driveemu` binary: runs the emulator on a chosen address for scripts and benchmarks.
//!
//! It prints `base_url=...`, `token_uri=...` and `root_folder_id=...` lines on stdout and
//! writes the credentials to the files named by flags, then serves until killed.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use driveemu::{Config, Emulator, RateLimit};

#[derive(Parser, Debug)]
#[command(name = "driveemu", about = "Google Drive API v3 emulator on loopback (plain HTTP)")]
struct Args {
    /// Address to listen on (keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Latency added to every request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Random extra latency of up to this many milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Bandwidth of the one shared link, in Mbit/s (0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    bandwidth_mbit: f64,
    /// Per-user request quota as RATE/BURST, e.g. 10/100.
    #[arg(long)]
    rate_limit: Option<String>,
    /// Probability of a 500/503 answer per API request.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Probability of a connection reset mid-body per media transfer.
    #[arg(long, default_value_t = 0.0)]
    reset_rate: f64,
    /// Lifetime of access tokens in seconds.
    #[arg(long, default_value_t = 3600)]
    token_lifetime_s: u64,
    /// New files stay out of files.list for this many milliseconds.
    #[arg(long, default_value_t = 0)]
    listing_lag_ms: u64,
    /// Seed for ids, tokens and fault dice.
    #[arg(long, default_value_t = 0x5eed_d21e)]
    seed: u64,
    /// Storage quota of My Drive in bytes.
    #[arg(long)]
    storage_quota: Option<u64>,
    /// Daily upload cap in bytes (Drive: 750 GB).
    #[arg(long)]
    daily_upload_cap: Option<u64>,
    /// Write the service-account key JSON here.
    #[arg(long)]
    sa_key_out: Option<std::path::PathBuf>,
    /// Write {client_id, client_secret, refresh_token, token_uri} JSON here.
    #[arg(long)]
    oauth_out: Option<std::path::PathBuf>,
    /// Create a shared drive of this name and print its id.
    #[arg(long)]
    shared_drive: Option<String>,
    /// Keep the request and byte counters in this JSON file, rewritten
    /// every half second, first before `base_url=` is printed (benchmarks
    /// read requests per run from it).
    #[arg(long)]
    stats_out: Option<std::path::PathBuf>,
    /// Keep file bytes (64 KiB and more) in unlinked files in this directory
    /// instead of in memory, for images larger than RAM.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

impl TryFrom<&Args> for Config {
    type Error = String;
    fn try_from(a: &Args) -> Result<Config, String> {
        let rate_limit = match &a.rate_limit {
            None => None,
            Some(s) => {
                let (r, b) = s.split_once('/').ok_or("--rate-limit wants RATE/BURST")?;
                let per_second: f64 = r.parse().map_err(|_| "bad --rate-limit rate")?;
                let burst: u32 = b.parse().map_err(|_| "bad --rate-limit burst")?;
                Some(RateLimit { per_second, burst })
            }
        };
        if !(0.0..=1.0).contains(&a.error_rate) || !(0.0..=1.0).contains(&a.reset_rate) {
            return Err("--error-rate and --reset-rate are probabilities in 0..=1".into());
        }
        Ok(Config {
            latency: Duration::from_millis(a.latency_ms),
            jitter: Duration::from_millis(a.jitter_ms),
            bandwidth_bps: (a.bandwidth_mbit > 0.0).then_some((a.bandwidth_mbit * 1e6) as u64),
            rate_limit,
            token_lifetime: Duration::from_secs(a.token_lifetime_s),
            listing_lag: Duration::from_millis(a.listing_lag_ms),
            seed: a.seed,
            data_dir: a.data_dir.clone(),
        })
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let cfg = match Config::try_from(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("driveemu: {e}");
            std::process::exit(2);
        }
    };
    let emu = match Emulator::start_on(args.listen, cfg).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("driveemu: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    emu.faults().set_error_rate(args.error_rate);
    emu.faults().set_reset_rate(args.reset_rate);
    emu.faults().set_storage_quota(args.storage_quota);
    emu.faults().set_daily_upload_cap(args.daily_upload_cap);
    if let Some(p) = &args.sa_key_out {
        if let Err(e) = std::fs::write(p, emu.service_account_key_json()) {
            eprintln!("driveemu: cannot write {}: {e}", p.display());
            std::process::exit(1);
        }
    }
    if let Some(p) = &args.oauth_out {
        let (id, secret) = emu.oauth_client();
        let v = serde_json::json!({
            "client_id": id, "client_secret": secret,
            "refresh_token": emu.issue_refresh_token(), "token_uri": emu.token_uri(),
        });
        if let Err(e) = std::fs::write(p, serde_json::to_string_pretty(&v).unwrap_or_default()) {
            eprintln!("driveemu: cannot write {}: {e}", p.display());
            std::process::exit(1);
        }
    }
    // The first counters are on disk before the URL is printed: a script that waits for the URL
    // can read them at once.
    if let Some(p) = &args.stats_out {
        write_stats(&emu, p);
    }
    println!("base_url={}", emu.base_url());
    println!("token_uri={}", emu.token_uri());
    println!("root_folder_id={}", emu.root_folder_id());
    if let Some(name) = &args.shared_drive {
        println!("shared_drive_id={}", emu.create_shared_drive(name));
    }
    // Scripts read the lines above before the first request.
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    match &args.stats_out {
        Some(p) => loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            write_stats(&emu, p);
        },
        None => std::future::pending::<()>().await,
    }
}

/// Writes the emulator's counters to `p`, renamed into place so a reader never sees half a file.
fn write_stats(emu: &Emulator, p: &std::path::Path) {
    let tmp = p.with_extension("tmp");
    let json = serde_json::to_vec_pretty(&emu.stats()).unwrap_or_default();
    if std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, p)).is_err() {
        eprintln!("driveemu: cannot write {}", p.display());
    }
}
