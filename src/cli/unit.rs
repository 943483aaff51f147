//! systemd: readiness and status notifications (`Type=notify`), and
//! `driveblk install-unit`, which installs the `driveblk@.service`
//! template (one instance per volume, config in /etc/driveblk/%i.toml).

use std::path::{Path, PathBuf};
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

/// What the shipped unit's sandbox lets the daemon touch, read from
/// [`UNIT`] itself so the two cannot drift apart.
struct Sandbox {
    /// Paths the daemon may write (the unit's directories and
    /// `ReadWritePaths=`); everything else is read-only
    /// (`ProtectSystem=strict`).
    writable: Vec<PathBuf>,
    private_devices: bool,
    private_tmp: bool,
    /// `ProtectHome=`: `None` when off, else its value (`read-only`, `yes`, `tmpfs`).
    protect_home: Option<String>,
}

impl Sandbox {
    fn of_unit() -> Self {
        let setting = |key: &str| -> Vec<&str> {
            UNIT.lines().filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('=')).collect()
        };
        let mut writable = Vec::new();
        for (key, root) in
            [("RuntimeDirectory", "/run"), ("CacheDirectory", "/var/cache"), ("StateDirectory", "/var/lib")]
        {
            for v in setting(key).iter().flat_map(|v| v.split_whitespace()) {
                writable.push(Path::new(root).join(v));
            }
        }
        for v in setting("ReadWritePaths").iter().flat_map(|v| v.split_whitespace()) {
            writable.push(PathBuf::from(v.trim_start_matches(['-', '+'])));
        }
        let yes = |key: &str| setting(key).last().is_some_and(|v| matches!(*v, "yes" | "true" | "1"));
        let protect_home =
            setting("ProtectHome").last().filter(|v| !matches!(**v, "no" | "false" | "0")).map(|v| v.to_string());
        Self { writable, private_devices: yes("PrivateDevices"), private_tmp: yes("PrivateTmp"), protect_home }
    }

    fn can_write(&self, p: &Path) -> bool {
        self.writable.iter().any(|w| p.starts_with(w))
    }

    /// Why the unit's sandbox would get in the way of `p`, if it would.
    /// `write`: the daemon writes there; `shared`: another process (QEMU)
    /// must see the same file.
    fn hinder(&self, what: &str, p: &Path, write: bool, shared: bool) -> Option<String> {
        let p = normalize(p);
        let shown = p.display();
        if self.private_devices && p.starts_with("/dev") && !p.starts_with("/dev/shm") {
            return Some(format!(
                "{what} {shown}: the unit has PrivateDevices=yes, so the service sees no {shown}; \
                 add a drop-in with PrivateDevices=no and DeviceAllow={shown} rw"
            ));
        }
        if self.private_tmp && (p.starts_with("/tmp") || p.starts_with("/var/tmp")) {
            return Some(if shared {
                format!(
                    "{what} {shown}: the unit has PrivateTmp=yes, so QEMU would not find it there; use /run/driveblk/"
                )
            } else {
                format!("{what} {shown}: the unit has PrivateTmp=yes: the service sees an empty private /tmp, not this path")
            });
        }
        if write && !self.can_write(&p) {
            let home = p.starts_with("/home") || p.starts_with("/root");
            let why = match (&self.protect_home, home) {
                (Some(v), true) => format!("ProtectHome={v}"),
                _ => "ProtectSystem=strict".to_string(),
            };
            let dir = if p.extension().is_some() { p.parent().unwrap_or(&p) } else { &p };
            return Some(format!(
                "{what} {shown}: the unit's {why} makes it read-only for the service; \
                 add a drop-in with ReadWritePaths={}",
                dir.display()
            ));
        }
        None
    }
}

/// `p` absolute, with `.` and `..` taken out lexically (the file need
/// not exist on the machine that checks the config).
fn normalize(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(p) };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// What would fail when `a` is served by the shipped `driveblk@.service`
/// as it stands (a warning each, with the drop-in that fixes it):
/// `config check` prints these, since under systemd the failure shows
/// only at start, as a permission or "no such file" error.
pub fn sandbox_warnings(a: &crate::cli::serve::ServeArgs) -> Vec<String> {
    let sb = Sandbox::of_unit();
    let mut out = Vec::new();
    let mut add = |w: Option<String>| out.extend(w);
    add(sb.hinder("socket", &a.socket, true, true));
    if let Some(c) = &a.control_socket {
        add(sb.hinder("control_socket", c, true, true));
    }
    if let Some(c) = &a.cache.cache_dir {
        add(sb.hinder("cache_dir", c, true, false));
    }
    if let Some(c) = &a.cache.shared_cache {
        add(sb.hinder("shared_cache", c, true, true));
    }
    if let Some(i) = &a.image {
        add(sb.hinder("image", i, !a.read_only, true));
    }
    if let Some(crate::remote::url::RemoteUrl::Dir { parent, name }) =
        a.volume.as_deref().and_then(|v| v.parse::<crate::remote::url::RemoteUrl>().ok())
    {
        add(sb.hinder("volume", &parent.join(name), !a.read_only, true));
    }
    out
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
