//! systemd: readiness and status notifications (`Type=notify`), and
//! `driveblk install-unit`, which installs the `driveblk@.service`
//! template (one instance per volume, config in /etc/driveblk/%i.toml).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use sd_notify::NotifyState;

/// The template unit, as shipped in `contrib/systemd/driveblk@.service`.
pub const UNIT: &str = include_str!("../../contrib/systemd/driveblk@.service");

/// Sends sd_notify messages when run by systemd (NOTIFY_SOCKET set);
/// does nothing otherwise.
#[derive(Clone, Debug)]
pub struct Notifier {
    on: bool,
}

impl Notifier {
    pub fn from_env() -> Self {
        Self { on: std::env::var_os("NOTIFY_SOCKET").is_some() }
    }

    fn send(&self, states: &[NotifyState]) {
        if self.on {
            if let Err(e) = sd_notify::notify(false, states) {
                tracing::debug!("sd_notify: {e}");
            }
        }
    }

    /// A `STATUS=` line (systemctl status shows it).
    pub fn status(&self, s: &str) {
        self.send(&[NotifyState::Status(s)]);
    }

    /// `READY=1`: the socket accepts connections and the disk is open.
    pub fn ready(&self, s: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(s)]);
    }

    /// `STOPPING=1`, with the stop timeout extended for up to `total` in
    /// the same message (see [`extend_timeout`](Self::extend_timeout)):
    /// finishing in-flight requests on a dead link, before the final sync
    /// even starts, may take longer than the unit's TimeoutStopSec.
    pub fn stopping(&self, s: &str, total: Duration) -> ExtendGuard {
        self.extend_with(&[NotifyState::Stopping, NotifyState::Status(s)], total)
    }

    /// Keeps systemd's stop timeout from firing for up to `total` (the
    /// final sync's own limit plus a margin): `EXTEND_TIMEOUT_USEC` now and
    /// then until the returned guard drops or `total` passes, so systemd
    /// neither kills an upload in progress nor waits past its limit.
    pub fn extend_timeout(&self, total: Duration) -> ExtendGuard {
        self.extend_with(&[], total)
    }

    /// [`extend_timeout`](Self::extend_timeout), its first message also
    /// carrying `with`.
    fn extend_with(&self, with: &[NotifyState], total: Duration) -> ExtendGuard {
        let done = Arc::new(AtomicBool::new(false));
        if !self.on {
            return ExtendGuard { done };
        }
        let (me, d) = (self.clone(), done.clone());
        let deadline = Instant::now() + total;
        // Each message must arrive before the previous extension runs out.
        let step = Duration::from_secs(60);
        let usec =
            move |left: Duration| left.min(step + Duration::from_secs(30)).as_micros().min(u32::MAX as u128) as u32;
        // The first one now, before the work it covers starts.
        let mut first = with.to_vec();
        first.push(NotifyState::ExtendTimeoutUsec(usec(total)));
        self.send(&first);
        let _ = std::thread::Builder::new().name("driveblk-sd-extend".into()).spawn(move || loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let until = Instant::now() + step.min(left);
            while Instant::now() < until && !d.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if d.load(Ordering::Acquire) || left.is_zero() {
                return;
            }
            me.send(&[NotifyState::ExtendTimeoutUsec(usec(left))]);
        });
        ExtendGuard { done }
    }
}

/// Stops the timeout extensions when dropped.
pub struct ExtendGuard {
    done: Arc<AtomicBool>,
}

impl Drop for ExtendGuard {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
    }
}

#[derive(Debug, Args)]
pub struct InstallUnitArgs {
    /// Directory to install the unit into.
    #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
    pub dir: PathBuf,
    /// Print the unit instead of installing it.
    #[arg(long)]
    pub print: bool,
}

/// `driveblk install-unit`: writes `driveblk@.service` (pointing at this
/// binary) and creates /etc/driveblk for the volumes' config files.
pub fn install(a: InstallUnitArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the driveblk binary")?;
    let unit = UNIT.replace("/usr/local/bin/driveblk", &exe.display().to_string());
    if a.print {
        print!("{unit}");
        return Ok(());
    }
    std::fs::create_dir_all(&a.dir).with_context(|| format!("cannot create {}", a.dir.display()))?;
    let path = a.dir.join("driveblk@.service");
    std::fs::write(&path, unit).with_context(|| format!("cannot write {}", path.display()))?;
    let _ = std::fs::create_dir_all("/etc/driveblk");
    eprintln!(
        "installed {}\nnext: write /etc/driveblk/NAME.toml (see docs/systemd.md; check it with `driveblk config check`),\n      then `systemctl daemon-reload && systemctl enable --now driveblk@NAME`",
        path.display()
    );
    Ok(())
}
