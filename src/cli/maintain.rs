//! Maintenance commands for a volume on its remote: `log`, `rollback`,
//! `gc` and `verify`, and the space lines `info` and `status` add.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use crate::cli::remote::RemoteArgs;
use crate::cli::size::human;
use crate::volume::gc::{self, GcOptions, Retention};
use crate::volume::history::{self, RollbackOptions};
use crate::volume::verify::{self, Readme, VerifyOptions};

/// Parses a duration: `90s`, `15m`, `24h`, `7d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('s') => (&t[..t.len() - 1], 1.0),
        Some('m') => (&t[..t.len() - 1], 60.0),
        Some('h') => (&t[..t.len() - 1], 3600.0),
        Some('d') => (&t[..t.len() - 1], 86400.0),
        _ => (t, 1.0),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 15m, 24h, 7d)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// Retention flags shared by gc, verify and info. Defaults come from the
/// environment (`DRIVEBLK_GC_KEEP_GENERATIONS`, `DRIVEBLK_GC_KEEP_DAYS`,
/// `DRIVEBLK_GC_GRACE`), else 10 generations, no age rule, 24 h grace.
#[derive(Debug, Clone, Args)]
pub struct RetentionArgs {
    /// Keep the K newest generations (the newest is always kept). Default:
    /// DRIVEBLK_GC_KEEP_GENERATIONS, else 10.
    #[arg(long, value_name = "K")]
    pub keep_generations: Option<u64>,
    /// Also keep every generation younger than D days. Default:
    /// DRIVEBLK_GC_KEEP_DAYS, else none.
    #[arg(long, value_name = "D")]
    pub keep_days: Option<f64>,
    /// Never delete an object younger than this (remote clock): a writer's
    /// upload about to be committed, a reader still serving an older
    /// generation. Default: DRIVEBLK_GC_GRACE, else 24h.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub grace: Option<Duration>,
}

impl RetentionArgs {
    /// A `DRIVEBLK_GC_*` default, if set. One that does not parse is an
    /// error naming it, never a silent fall back to the built-in default:
    /// `DRIVEBLK_GC_KEEP_DAYS=7d` ignored would let gc (serve's daily one
    /// too) delete the week of generations it was set to keep.
    fn env<T>(name: &str, expected: &str, parse: impl Fn(&str) -> Option<T>) -> anyhow::Result<Option<T>> {
        match std::env::var(name) {
            Err(std::env::VarError::NotPresent) => Ok(None),
            Ok(v) if v.trim().is_empty() => Ok(None),
            Ok(v) => parse(v.trim()).map(Some).ok_or_else(|| anyhow::anyhow!("invalid {name}={v:?}: {expected}")),
            Err(std::env::VarError::NotUnicode(v)) => bail!("invalid {name}={v:?}: {expected}"),
        }
    }

    /// Gc options with these flags (over the environment's defaults).
    pub fn options(&self, remote: &RemoteArgs) -> anyhow::Result<GcOptions> {
        self.options_with(remote.options())
    }

    /// [`options`](Self::options) with remote options already made.
    pub fn options_with(&self, remote: crate::volume::RemoteOptions) -> anyhow::Result<GcOptions> {
        let d = Retention::default();
        let grace = match self.grace {
            Some(g) => g,
            None => Self::env("DRIVEBLK_GC_GRACE", "a duration such as 24h or 7d", |v| parse_duration(v).ok())?
                .unwrap_or(gc::DEFAULT_GRACE),
        };
        let keep_generations = match self.keep_generations {
            Some(k) => k,
            None => Self::env("DRIVEBLK_GC_KEEP_GENERATIONS", "a number of generations, e.g. 10", |v| v.parse().ok())?
                .unwrap_or(d.keep_generations),
        };
        let keep_days = match self.keep_days {
            Some(k) => Some(k),
            None => Self::env("DRIVEBLK_GC_KEEP_DAYS", "a number of days, e.g. 7 or 0.5", |v| {
                v.parse::<f64>().ok().filter(|d| d.is_finite() && *d >= 0.0)
            })?
            .or(d.keep_days),
        };
        Ok(GcOptions { retention: Retention { keep_generations, keep_days }, grace, remote, ..GcOptions::default() })
    }
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// The volume whose generations to list.
    pub url: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The volume to roll back.
    pub url: String,
    /// The generation whose content becomes current again (as a new
    /// generation; nothing is deleted).
    pub generation: u64,
    /// Even if another host committed a moment ago.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// The volume to clean up.
    pub url: String,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Print what would be deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Even if another host committed a moment ago.
    #[arg(long)]
    pub force: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The volume to check.
    pub url: String,
    /// Download every referenced chunk and check its hash (default: check
    /// metadata only — presence, trash, size).
    #[arg(long)]
    pub full: bool,
    /// Write the folder's README.txt if it is missing.
    #[arg(long)]
    pub repair: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

fn when(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => {
            let age = history_now_ms().saturating_sub(ms) / 1000;
            match age {
                a if a < 120 => format!("{a} s ago"),
                a if a < 7200 => format!("{} min ago", a / 60),
                a if a < 172_800 => format!("{} h ago", a / 3600),
                a => format!("{} days ago", a / 86400),
            }
        }
        None => "?".into(),
    }
}

fn history_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub fn log(a: LogArgs) -> anyhow::Result<()> {
    let l = history::log(&a.url, &a.remote.options())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&l)?);
        return Ok(());
    }
    println!(
        "{:>8}  {:<14} {:<18} {:<10} {:>10} {:>10}  note",
        "gen", "created", "host", "kind", "changed", "uploaded"
    );
    for e in &l.entries {
        let kind = if e.checkpoint { "checkpoint" } else { "delta" };
        let mut note = e.note.clone().unwrap_or_default();
        if let Some(p) = &e.problem {
            note = format!("{note} {p}").trim().to_string();
        }
        if e.generation == l.newest {
            note = format!("{note} (newest)").trim().to_string();
        }
        println!(
            "{:>8}  {:<14} {:<18} {:<10} {:>10} {:>10}  {}",
            e.generation,
            when(e.created_ms),
            e.host.as_deref().unwrap_or("?"),
            kind,
            human(e.bytes_changed),
            human(e.bytes_uploaded),
            note
        );
    }
    Ok(())
}

pub fn rollback(a: RollbackArgs) -> anyhow::Result<()> {
    let r = history::rollback(&a.url, a.generation, &RollbackOptions { force: a.force, remote: a.remote.options() })?;
    eprintln!(
        "rolled back: generation {} now holds generation {}'s content (generations {}..={} are kept until gc retires them)",
        r.generation,
        r.from,
        r.from + 1,
        r.previous
    );
    Ok(())
}

pub fn gc(a: GcArgs) -> anyhow::Result<()> {
    let mut opts = a.retention.options(&a.remote)?;
    opts.dry_run = a.dry_run;
    opts.force = a.force;
    let r = gc::gc(&a.url, &opts).with_context(|| format!("gc of {}", a.url))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    if r.dry_run {
        for (k, s) in &r.deleted {
            println!("would delete {k} ({})", human(*s));
        }
    }
    println!(
        "{verb} {} objects ({}); objects {} -> {}, bytes {} -> {}",
        r.deleted.len(),
        human(r.deleted.iter().map(|(_, s)| s).sum()),
        r.objects_before,
        r.objects_after,
        human(r.bytes_before),
        human(r.bytes_after)
    );
    println!(
        "kept generations {:?} (newest {}), plus {} for delta chains or too young to delete",
        r.kept,
        r.newest,
        r.also_kept.len()
    );
    for f in &r.forks {
        println!(
            "fork {} ({}) keeps generation {}: if that volume is gone for good (deleted, not just moved), \
             delete {} in this volume's folder and gc frees what only it kept",
            f.volume_id,
            f.url,
            f.from_generation,
            crate::volume::fork::registration_key(&f.volume_id)
        );
    }
    for (g, what) in &r.held_for_changes {
        println!(
            "generation {g} is kept for {what}: `driveblk fork` or `discard-local` there removes the hold \
             (or delete its hold-*.json by hand if that machine and its cache are gone for good)"
        );
    }
    if r.young > 0 {
        println!("{} unreferenced objects are younger than the grace period and were left", r.young);
    }
    if !r.scratch.is_empty() {
        println!(
            "{verb} {} leftovers of uploads cut short ({}, hidden temp files)",
            r.scratch.len(),
            human(r.scratch.iter().map(|(_, s)| s).sum())
        );
    }
    match (r.repack_generation, &r.repack_skipped) {
        (Some(g), _) => println!("repacked {} packs into generation {g}", r.repacked.len()),
        (None, Some(why)) => println!("repack skipped: {why}"),
        (None, None) if r.dry_run && !r.repacked.is_empty() => {
            println!("would repack {} mostly-dead packs", r.repacked.len())
        }
        _ => {}
    }
    println!("space now: {} live, {} dead", human(r.live_bytes), human(r.dead_bytes));
    Ok(())
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    let opts = VerifyOptions { full: a.full, repair: a.repair, remote: a.remote.options(), ..Default::default() };
    let r = verify::verify(&a.url, &opts)?;
    println!(
        "checked {} generations (newest {}), {} objects{}",
        r.generations.len(),
        r.newest,
        r.objects_checked,
        if a.full { format!(", {} chunks downloaded and hash-checked", r.frames_checked) } else { String::new() }
    );
    for p in &r.problems {
        println!("PROBLEM  {p} — affects generations {:?}", p.generations);
    }
    match r.readme {
        Readme::Present => {}
        Readme::Missing => println!("note: {} is missing (`driveblk verify --repair` writes it)", verify::README_KEY),
        Readme::Written => println!("wrote {}", verify::README_KEY),
    }
    print!("{}", r.advice());
    if !r.advice().ends_with('\n') {
        println!();
    }
    if !r.is_clean() {
        bail!("volume {} has {} problems", a.url, r.problems.len());
    }
    Ok(())
}

/// Lines `info` adds: space used vs reclaimable.
pub fn space_lines(url: &str, remote: &RemoteArgs) -> anyhow::Result<String> {
    let opts = RetentionArgs { keep_generations: None, keep_days: None, grace: None }.options(remote)?;
    let s = gc::space(url, &opts)?;
    Ok(format!(
        "space       {} in {} objects ({} generations): {} live, {} dead; `driveblk gc` would free {} now\n",
        human(s.used_bytes),
        s.objects,
        s.generations,
        human(s.live_bytes),
        human(s.dead_bytes),
        human(s.reclaimable_now)
    ))
}

/// What `status` adds when write-back is paused on a full Drive: how much
/// gc would free.
pub fn quota_hint(url: &str, status: &serde_json::Value) -> Option<String> {
    let sync = status.get("sync")?;
    let paused = sync.get("paused").and_then(|v| v.as_bool()).unwrap_or(false);
    let err = sync.get("last_error").and_then(|v| v.as_str()).unwrap_or("");
    if !paused || !err.contains("quota") {
        return None;
    }
    // Remote settings from the environment, as `status` takes no flags.
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        remote: RemoteArgs,
    }
    let remote = <Defaults as clap::Parser>::try_parse_from(["driveblk"]).ok()?.remote;
    Some(match space_lines(url, &remote) {
        Ok(line) => format!(
            "quota       the remote is full; write-back waits (the guest runs on, changes stay in the cache)\n{line}\
             hint        free space: `driveblk gc {url}` (or fewer kept generations: `--keep-generations 2`)\n"
        ),
        Err(e) => {
            format!("quota       the remote is full; write-back waits; could not measure what gc would free: {e:#}\n")
        }
    })
}
