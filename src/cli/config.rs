//! Config files: one TOML file per volume holding any `serve` option
//! (`driveblk serve --config FILE`; flags given on the command line
//! override the file), and `driveblk config check FILE`, which validates
//! one and points at the line of each mistake. Secrets are never in the
//! file: it names a credentials file, or a systemd credential.

use std::ffi::OsString;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use toml::Spanned;

use crate::cli::Cli;

/// A size: `"2G"` or a number of bytes.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

/// One file value as `serve` arguments.
enum Arg {
    Flag(bool),
    Value(String),
    /// A list: the flag once per value.
    Values(Vec<String>),
}

trait ToArg {
    fn to_arg(&self) -> Arg;
}

impl ToArg for String {
    fn to_arg(&self) -> Arg {
        Arg::Value(self.clone())
    }
}

impl ToArg for Vec<String> {
    fn to_arg(&self) -> Arg {
        Arg::Values(self.clone())
    }
}

impl ToArg for u64 {
    fn to_arg(&self) -> Arg {
        Arg::Value(self.to_string())
    }
}

impl ToArg for bool {
    fn to_arg(&self) -> Arg {
        Arg::Flag(*self)
    }
}

impl ToArg for Size {
    fn to_arg(&self) -> Arg {
        match self {
            Size::Bytes(n) => Arg::Value(n.to_string()),
            Size::Text(s) => Arg::Value(s.clone()),
        }
    }
}

/// Declares the file's keys: each is the `serve` flag of the same name
/// (`num_queues` is `--num-queues`), with the type the file accepts.
macro_rules! serve_file {
    ($( $(#[$doc:meta])* $key:ident : $ty:ty ),* $(,)?) => {
        /// A volume's config file.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ServeFile {
            $( $(#[$doc])* #[serde(default)] pub $key: Option<Spanned<$ty>>, )*
            /// Name of a systemd credential holding the Drive credentials
            /// (`LoadCredential=NAME:PATH` in the unit): read from
            /// `$CREDENTIALS_DIRECTORY/NAME`.
            #[serde(default)]
            pub drive_credential: Option<Spanned<String>>,
            /// Name of a systemd credential holding an encrypted volume's
            /// key: `--key-file $CREDENTIALS_DIRECTORY/NAME`.
            #[serde(default)]
            pub key_credential: Option<Spanned<String>>,
        }

        impl ServeFile {
            /// Every key that maps to a `serve` flag.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($key)),*];

            /// (key, where its value is in the file, the argument).
            fn items(&self) -> Vec<(&'static str, Range<usize>, Arg)> {
                let mut out = Vec::new();
                $( if let Some(v) = &self.$key {
                    out.push((stringify!($key), v.span(), v.get_ref().to_arg()));
                } )*
                out
            }
        }
    };
}

serve_file! {
    socket: String,
    image: String,
    volume: String,
    format: String,
    read_only: bool,
    force_takeover: bool,
    ephemeral: bool,
    num_queues: u64,
    queue_size: u64,
    serial: String,
    io_threads: u64,
    poll_us: u64,
    queue_threads: u64,
    metadata_cache: Size,
    control_socket: String,
    socket_group: String,
    socket_mode: String,
    metrics: String,
    cache_dir: String,
    ram_cache: Size,
    ssd_cache: Size,
    ssd_min_free: Size,
    hydrate: bool,
    first_boot_whole_below: Size,
    encrypt_cache: bool,
    shared_cache: String,
    shared_cache_max: Size,
    fetch_concurrency: u64,
    readahead_chunks: u64,
    boot_profile: String,
    boot_profile_window: u64,
    cache: String,
    sync_interval: u64,
    sync_timeout: u64,
    on_remote_error: String,
    remote_wait: u64,
    remote_latency_ms: u64,
    remote_bandwidth_mbit: u64,
    bwlimit: String,
    drive_api_url: String,
    drive_token_uri: String,
    drive_credentials: String,
    drive_scope: String,
    drive_pacer: String,
    key_file: String,
    key_env: String,
    passphrase: bool,
    allow_base: Vec<String>,
    log_level: String,
}

/// A parsed config file and its text (for line numbers).
pub struct Loaded {
    pub path: PathBuf,
    text: String,
    file: ServeFile,
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}

/// Keys that look like an inlined secret are refused with a pointer to
/// how to reference one instead.
const SECRET_HINT: &str =
    "secrets are never written in a config file: use `drive_credentials = \"/path/to/file.json\"` or \
     `drive_credential = \"NAME\"` (a systemd credential, LoadCredential=NAME:PATH)";

impl Loaded {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        let file: ServeFile = toml::from_str(&text).map_err(|e| {
            let msg = e.to_string();
            let hint = if ["token", "secret", "password", "key"].iter().any(|k| msg.contains(&format!("`{k}")))
                || msg.contains("client_secret")
                || msg.contains("access_token")
            {
                format!("\n{SECRET_HINT}")
            } else {
                String::new()
            };
            anyhow::anyhow!("{}: {msg}{hint}", path.display())
        })?;
        Ok(Self { path: path.to_path_buf(), text, file })
    }

    fn at(&self, span: Range<usize>) -> String {
        let (l, c) = line_col(&self.text, span.start);
        format!("{}:{l}:{c}", self.path.display())
    }

    /// The file's settings as `serve` arguments.
    pub fn to_args(&self) -> anyhow::Result<Vec<OsString>> {
        self.to_args_in(std::env::var_os("CREDENTIALS_DIRECTORY"))
    }

    /// [`to_args`](Self::to_args) with systemd credentials read from
    /// `credentials` (`$CREDENTIALS_DIRECTORY` under the unit).
    fn to_args_in(&self, credentials: Option<OsString>) -> anyhow::Result<Vec<OsString>> {
        let mut out: Vec<OsString> = Vec::new();
        for (key, span, arg) in self.file.items() {
            let flag = format!("--{}", key.replace('_', "-"));
            match arg {
                Arg::Flag(true) => out.push(flag.into()),
                Arg::Flag(false) => {}
                Arg::Value(v) => {
                    out.push(flag.into());
                    out.push(v.into());
                }
                Arg::Values(vs) => {
                    for v in vs {
                        out.push(flag.clone().into());
                        out.push(v.into());
                    }
                }
            }
            let _ = span;
        }
        if let Some(name) = &self.file.drive_credential {
            if self.file.drive_credentials.is_some() {
                bail!("{}: give drive_credential or drive_credentials, not both", self.at(name.span()));
            }
            let Some(dir) = credentials.clone() else {
                bail!(
                    "{}: drive_credential = {:?} needs $CREDENTIALS_DIRECTORY (run by systemd with LoadCredential={}:PATH)",
                    self.at(name.span()),
                    name.get_ref(),
                    name.get_ref()
                );
            };
            let n = name.get_ref();
            if n.contains('/') || n.is_empty() || n == ".." {
                bail!("{}: {n:?} is not a credential name", self.at(name.span()));
            }
            out.push("--drive-credentials".into());
            out.push(PathBuf::from(dir).join(n).into());
        }
        if let Some(name) = &self.file.key_credential {
            let n = name.get_ref();
            let Some(dir) = credentials.clone() else {
                bail!(
                    "{}: key_credential = {n:?} needs $CREDENTIALS_DIRECTORY (LoadCredential={n}:PATH)",
                    self.at(name.span())
                );
            };
            if n.contains('/') || n.is_empty() || n == ".." || self.file.key_file.is_some() {
                bail!("{}: {n:?} is not a credential name, or key_file is given too", self.at(name.span()));
            }
            out.push("--key-file".into());
            out.push(PathBuf::from(dir).join(n).into());
        }
        Ok(out)
    }

    /// Where in the file the key behind `--flag-name` is.
    fn locate_flag(&self, message: &str) -> Option<String> {
        self.file
            .items()
            .into_iter()
            .filter(|(k, _, _)| message.contains(&format!("--{}", k.replace('_', "-"))))
            .max_by_key(|(k, _, _)| k.len())
            .map(|(k, span, _)| format!("{} ({k})", self.at(span)))
    }
}

/// Where `serve` sits in argv (after global options), if it is the command.
fn serve_index(args: &[OsString]) -> Option<usize> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--log-level" {
            i += 2;
            continue;
        }
        if a.starts_with('-') {
            i += 1;
            continue;
        }
        return (a == "serve").then_some(i);
    }
    None
}

/// The `--config FILE` given to serve, if any.
fn config_arg(args: &[OsString], from: usize) -> Option<PathBuf> {
    let mut it = args[from..].iter();
    while let Some(a) = it.next() {
        if a == "--" {
            return None;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// For `serve --config FILE`: argv with the file's settings inserted right
/// after `serve`, so any flag on the command line (parsed later) wins.
pub fn expand_args(args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(i) = serve_index(&args) else { return Ok(args) };
    let Some(path) = config_arg(&args, i + 1) else { return Ok(args) };
    let loaded = Loaded::read(&path)?;
    let extra = loaded.to_args()?;
    let mut out = args[..=i].to_vec();
    out.extend(extra);
    out.extend_from_slice(&args[i + 1..]);
    Ok(out)
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a volume's config file; errors name the line.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The config file, e.g. /etc/driveblk/NAME.toml.
    pub file: PathBuf,
}

pub fn run(c: ConfigCommand) -> anyhow::Result<()> {
    match c {
        ConfigCommand::Check(a) => check(&a.file).map(|summary| println!("{summary}")),
    }
}

/// Validates a config file as `serve` would read it, without opening
/// anything. Returns a one-line summary.
pub fn check(path: &Path) -> anyhow::Result<String> {
    let loaded = Loaded::read(path)?;
    let mut argv: Vec<OsString> = vec!["driveblk".into(), "serve".into()];
    // Checked before systemd runs the unit, where the credentials directory
    // does not exist yet: the names are checked, the files are the unit's.
    let unit = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY")
        .unwrap_or_else(|| format!("/run/credentials/driveblk@{unit}.service").into());
    argv.extend(loaded.to_args_in(Some(credentials))?);
    let cli = match Cli::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) => {
            let msg = e.render().to_string();
            let first = msg.lines().next().unwrap_or("").trim_start_matches("error: ").to_string();
            let missing = first.contains("were not provided") || first.contains("required");
            if missing {
                let keys: Vec<String> = msg
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("--"))
                    .map(|l| l.split_whitespace().next().unwrap_or("").replace('-', "_"))
                    .collect();
                bail!("{}: missing key(s): {}", path.display(), keys.join(", "));
            }
            let whence = loaded.locate_flag(&msg);
            let detail = msg.lines().skip(1).filter(|l| !l.trim().is_empty() && !l.contains("For more information"));
            let detail: Vec<&str> = detail.collect();
            bail!(
                "{}: {}{}",
                whence.unwrap_or_else(|| path.display().to_string()),
                first.replace("--", "").replace('-', "_").replace("_ ", "- "),
                if detail.is_empty() { String::new() } else { format!("\n{}", detail.join("\n")) }
            );
        }
    };
    let crate::cli::Command::Serve(a) = cli.command else { unreachable!("parsed as serve") };
    // The checks `serve` makes before opening anything.
    let what = match (&a.image, &a.volume) {
        (Some(i), _) => format!("image {}", i.display()),
        (_, Some(v)) => format!("volume {v}"),
        _ => bail!("{}: give image or volume", path.display()),
    };
    crate::cli::serve::validate_device(&a).map_err(|e| match loaded.locate_flag(&e.to_string()) {
        Some(at) => anyhow::anyhow!("{at}: {}", e.to_string().replace("--", "").replace('-', "_")),
        None => anyhow::anyhow!("{}: {e}", path.display()),
    })?;
    let mut summary = format!("{}: ok ({what} on {})", path.display(), a.socket.display());
    for w in crate::cli::unit::sandbox_warnings(&a) {
        summary.push_str(&format!("\nwarning: under driveblk@.service, {w}"));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_serve_flag_has_a_config_key() {
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        for arg in serve.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["config", "help"].contains(&long) {
                continue;
            }
            let key = long.replace('-', "_");
            assert!(ServeFile::KEYS.contains(&key.as_str()), "serve --{long} has no config file key {key}");
        }
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("vol.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_list_key_is_its_flag_once_per_value() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "volume = \"dir:/v\"\nallow_base = [\"dir:/a\", \"dir:/b\"]\n");
        let args = Loaded::read(&p).unwrap().to_args().unwrap();
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(args, ["--volume", "dir:/v", "--allow-base", "dir:/a", "--allow-base", "dir:/b"]);
    }

    #[test]
    fn check_accepts_a_full_file_and_points_at_bad_lines() {
        let d = tempfile::tempdir().unwrap();
        let ok = "socket = \"/run/driveblk/w10.sock\"\nvolume = \"dir:/mnt/nas/w10\"\nformat = \"qcow2\"\n\
                  ram_cache = \"2G\"\nssd_cache = 68719476736\nnum_queues = 2\nread_only = false\n\
                  socket_mode = \"0660\"\ncache = \"writeback\"\nsync_interval = 10\n";
        let s = check(&write(d.path(), ok)).unwrap();
        assert!(s.contains("ok (volume dir:/mnt/nas/w10"), "{s}");
        assert!(!s.contains("warning"), "the unit's own layout is fine: {s}");

        // An unknown key: line and column from toml's span.
        let e = check(&write(d.path(), "socket = \"/s\"\nvolume = \"dir:/v\"\nnum_queue = 2\n")).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("line 3") && e.contains("num_queue"), "{e}");
        // A wrong type.
        let e = format!("{:#}", check(&write(d.path(), "socket = \"/s\"\nnum_queues = \"two\"\n")).unwrap_err());
        assert!(e.contains("line 2"), "{e}");
        // A value clap refuses: the line of that key.
        let e = format!(
            "{:#}",
            check(&write(d.path(), "socket = \"/s\"\nvolume = \"dir:/v\"\nformat = \"qcow2\"\nram_cache = \"lots\"\n"))
                .unwrap_err()
        );
        assert!(e.contains("vol.toml:4:"), "{e}");
        // A value serve refuses.
        let e = format!(
            "{:#}",
            check(&write(d.path(), "socket = \"/s\"\nvolume = \"dir:/v\"\nformat = \"raw\"\nnum_queues = 0\n"))
                .unwrap_err()
        );
        assert!(e.contains("vol.toml:4:") && e.contains("num_queues"), "{e}");
        // A secret written inline is refused with the way to reference one.
        let e = format!("{:#}", check(&write(d.path(), "socket = \"/s\"\ntoken = \"ya29.x\"\n")).unwrap_err());
        assert!(e.contains("never written in a config file"), "{e}");
    }

    #[test]
    fn check_warns_of_what_the_units_sandbox_would_refuse() {
        let d = tempfile::tempdir().unwrap();
        let warn = |text: &str| -> Vec<String> {
            let s = check(&write(d.path(), text)).unwrap();
            s.lines().filter_map(|l| l.strip_prefix("warning: under driveblk@.service, ")).map(String::from).collect()
        };
        // A block device: PrivateDevices hides it.
        let w = warn("socket = \"/run/driveblk/a.sock\"\nimage = \"/dev/vg0/w10\"\nformat = \"raw\"\n");
        assert!(
            w.len() == 1 && w[0].contains("PrivateDevices=no") && w[0].contains("DeviceAllow=/dev/vg0/w10"),
            "{w:?}"
        );
        // A writable image outside the writable paths; read-only, it is fine.
        let w = warn("socket = \"/run/driveblk/a.sock\"\nimage = \"/var/lib/libvirt/images/w10.qcow2\"\n");
        assert!(w.len() == 1 && w[0].contains("ReadWritePaths=/var/lib/libvirt/images"), "{w:?}");
        let w = warn(
            "socket = \"/run/driveblk/a.sock\"\nimage = \"/var/lib/libvirt/images/w10.qcow2\"\nread_only = true\n",
        );
        assert!(w.is_empty(), "{w:?}");
        // A socket in the private /tmp, a dir: remote in a home directory.
        let w = warn("socket = \"/tmp/w10.sock\"\nvolume = \"dir:/home/me/vms/w10\"\n");
        assert!(w.len() == 2, "{w:?}");
        assert!(w[0].contains("PrivateTmp=yes") && w[0].contains("QEMU would not find it"), "{w:?}");
        assert!(w[1].contains("ProtectHome=read-only") && w[1].contains("ReadWritePaths=/home/me/vms/w10"), "{w:?}");
        // Paths are taken lexically: /mnt/../etc is not under /mnt.
        let w = warn("socket = \"/run/driveblk/a.sock\"\ncache_dir = \"/mnt/../etc/c\"\nvolume = \"dir:/srv/v\"\n");
        assert!(w.len() == 1 && w[0].contains("cache_dir /etc/c"), "{w:?}");
    }

    #[test]
    fn flags_on_the_command_line_override_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "socket = \"/from/file\"\nvolume = \"dir:/v\"\nformat = \"raw\"\nnum_queues = 2\n");
        let argv: Vec<OsString> =
            ["driveblk", "--log-level", "debug", "serve", "--config", p.to_str().unwrap(), "--num-queues", "4"]
                .iter()
                .map(OsString::from)
                .collect();
        let cli = Cli::try_parse_from(expand_args(argv).unwrap()).unwrap();
        let crate::cli::Command::Serve(a) = cli.command else { panic!() };
        assert_eq!(a.num_queues, Some(4), "the flag wins");
        assert_eq!(a.socket, PathBuf::from("/from/file"), "the file fills the rest");
        assert_eq!(a.volume.as_deref(), Some("dir:/v"));
    }

    #[test]
    fn drive_credential_names_a_systemd_credential() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "socket = \"/s\"\nvolume = \"gdrive:/v\"\nformat = \"raw\"\ndrive_credential = \"drive.json\"\n",
        );
        let l = Loaded::read(&p).unwrap();
        // SAFETY (test): no other test reads this variable.
        std::env::remove_var("CREDENTIALS_DIRECTORY");
        assert!(format!("{:#}", l.to_args().unwrap_err()).contains("CREDENTIALS_DIRECTORY"));
        std::env::set_var("CREDENTIALS_DIRECTORY", "/run/credentials/driveblk@w10.service");
        let args = l.to_args().unwrap();
        std::env::remove_var("CREDENTIALS_DIRECTORY");
        let i = args.iter().position(|a| a == "--drive-credentials").unwrap();
        assert_eq!(args[i + 1], OsString::from("/run/credentials/driveblk@w10.service/drive.json"));
    }
}
