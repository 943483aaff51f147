//! Remote URLs: `dir:/path/NAME` names a volume folder or an object file in
//! a folder; `gdrive:/Folder/NAME`, `gdrive:id=FOLDER_ID/NAME` and
//! `gdrive:file=FILE_ID` do the same on Google Drive, and
//! `s3://BUCKET/prefix/NAME`, `gs://...`, `az://CONTAINER/...` on object
//! stores (a folder is a key prefix there). The same syntax serves
//! both, since a volume is a folder of objects and a base image is one
//! object in a folder.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use super::config::RemoteConfig;
use super::gdrive::{path::DriveLocation, GDriveRemote};
use super::objstore::{ObjStoreRemote, StoreKind};
use super::{DirRemote, DynRemote};

/// Why a URL could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("unsupported remote URL {0:?}: expected dir:/path/NAME (a folder path, local or NFS/SMB mounted), gdrive:/Folder/NAME, gdrive:id=FOLDER_ID/NAME, gdrive:file=FILE_ID, s3://BUCKET/path/NAME, gs://BUCKET/path/NAME or az://CONTAINER/path/NAME")]
    Scheme(String),
    #[error("remote URL {0:?} has no name: expected dir:/path/NAME, not a bare folder or root")]
    NoName(String),
    #[error("invalid Google Drive URL {url:?}: {reason}")]
    Drive { url: String, reason: String },
}

/// Which backend a URL is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// A local (or network-mounted) folder.
    Dir,
    /// Google Drive.
    GDrive,
    /// An object store (S3, GCS, Azure).
    ObjStore,
}

/// A parsed remote URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteUrl {
    /// A parent folder and a name in it.
    Dir {
        /// The folder holding `name` (absolute).
        parent: PathBuf,
        /// The last path component: a volume folder or an object's key.
        name: String,
    },
    /// A place on Google Drive.
    GDrive(DriveLocation),
    /// A key prefix and a name in a bucket.
    ObjStore {
        kind: StoreKind,
        bucket: String,
        /// The prefix holding `name`, without leading or trailing `/`
        /// (empty: the bucket's top).
        parent: String,
        /// A volume folder (prefix) or an object's key.
        name: String,
    },
}

impl RemoteUrl {
    /// Parses `dir:/path/NAME` (relative paths are resolved against the
    /// current directory so a stored URL, e.g. a volume's base, stays
    /// valid) or a `gdrive:` URL.
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        if let Some(rest) = s.strip_prefix("gdrive:") {
            return DriveLocation::parse(rest)
                .map(RemoteUrl::GDrive)
                .map_err(|reason| UrlError::Drive { url: s.to_string(), reason });
        }
        if let Some((kind, rest)) = StoreKind::strip(s) {
            let mut parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
            if parts.len() < 2 || parts.iter().any(|p| *p == "." || *p == "..") {
                return Err(UrlError::NoName(s.to_string()));
            }
            let name = parts.pop().unwrap_or_default().to_string();
            let bucket = parts.remove(0).to_string();
            return Ok(RemoteUrl::ObjStore { kind, bucket, parent: parts.join("/"), name });
        }
        let rest = s.strip_prefix("dir:").ok_or_else(|| UrlError::Scheme(s.to_string()))?;
        // Accept dir:///abs as well as dir:/abs.
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        if rest.is_empty() {
            return Err(UrlError::NoName(s.to_string()));
        }
        let mut p = PathBuf::from(rest);
        if p.is_relative() {
            p = std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| PathBuf::from(rest));
        }
        let p = normalize(&p);
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| UrlError::NoName(s.to_string()))?;
        let parent = p.parent().map(Path::to_path_buf).ok_or_else(|| UrlError::NoName(s.to_string()))?;
        Ok(RemoteUrl::Dir { parent, name })
    }

    /// The backend.
    pub fn scheme(&self) -> Scheme {
        match self {
            RemoteUrl::Dir { .. } => Scheme::Dir,
            RemoteUrl::GDrive(_) => Scheme::GDrive,
            RemoteUrl::ObjStore { .. } => Scheme::ObjStore,
        }
    }

    /// The full path (`parent/name`) of a `dir:` URL.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            RemoteUrl::Dir { parent, name } => Some(parent.join(name)),
            RemoteUrl::GDrive(_) | RemoteUrl::ObjStore { .. } => None,
        }
    }

    /// A remote rooted at the folder this URL names (how a volume is
    /// opened), configured from the environment (see
    /// [`RemoteConfig::from_env`]).
    pub fn folder(&self) -> DynRemote {
        self.folder_with(&RemoteConfig::from_env_or_default())
    }

    /// [`folder`](Self::folder) with explicit configuration. Synchronous:
    /// a Drive folder is resolved at its first use.
    pub fn folder_with(&self, cfg: &RemoteConfig) -> DynRemote {
        match self {
            // A volume's objects are files driveblk wrote, never links:
            // one planted by whoever can write the folder (an adopted
            // base copy, read without a digest) could name any host file.
            RemoteUrl::Dir { parent, name } => {
                Arc::new(DirRemote::new(parent.join(name)).refusing_symlinks().with_bwlimit(cfg.bwlimit().clone()))
            }
            RemoteUrl::GDrive(loc) => merging(Arc::new(GDriveRemote::folder(loc, &cfg.drive)), cfg),
            RemoteUrl::ObjStore { kind, bucket, parent, name } => {
                let root = if parent.is_empty() { name.clone() } else { format!("{parent}/{name}") };
                Arc::new(ObjStoreRemote::new(*kind, bucket, &root, &cfg.objstore))
            }
        }
    }

    /// A remote rooted at the parent folder and the key of the object this
    /// URL names (how a base image file is opened).
    pub fn object(&self) -> (DynRemote, String) {
        self.object_with(&RemoteConfig::from_env_or_default())
    }

    /// [`object`](Self::object) with explicit configuration.
    pub fn object_with(&self, cfg: &RemoteConfig) -> (DynRemote, String) {
        match self {
            RemoteUrl::Dir { parent, name } => {
                (Arc::new(DirRemote::new(parent.clone()).with_bwlimit(cfg.bwlimit().clone())), name.clone())
            }
            RemoteUrl::GDrive(loc) => {
                let (r, key) = GDriveRemote::object(loc, &cfg.drive);
                (merging(Arc::new(r), cfg), key)
            }
            RemoteUrl::ObjStore { kind, bucket, parent, name } => {
                (Arc::new(ObjStoreRemote::new(*kind, bucket, parent, &cfg.objstore)), name.clone())
            }
        }
    }
}

/// Drive limits requests per user: ranged reads of one file asked at
/// once go out merged (the account's counters are in `DriveApi::read_merge`).
fn merging(r: DynRemote, cfg: &RemoteConfig) -> DynRemote {
    let stats = super::gdrive::api_for(&cfg.drive).read_merge.clone();
    Arc::new(super::merge::MergingRemote::new(r, cfg.drive.read_merge, stats))
}

/// Removes `.` and resolves `..` lexically (no symlink lookups: the path may
/// be on a remote mount that is slow or absent right now).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

impl fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteUrl::Dir { parent, name } => write!(f, "dir:{}", parent.join(name).display()),
            RemoteUrl::GDrive(loc) => write!(f, "{loc}"),
            RemoteUrl::ObjStore { kind, bucket, parent, name } if parent.is_empty() => {
                write!(f, "{}{bucket}/{name}", kind.scheme())
            }
            RemoteUrl::ObjStore { kind, bucket, parent, name } => {
                write!(f, "{}{bucket}/{parent}/{name}", kind.scheme())
            }
        }
    }
}

impl FromStr for RemoteUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, UrlError> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dir_urls() {
        let u = RemoteUrl::parse("dir:/mnt/drive/vols/win10").unwrap();
        assert_eq!(u, RemoteUrl::Dir { parent: PathBuf::from("/mnt/drive/vols"), name: "win10".into() });
        assert_eq!(u.to_string(), "dir:/mnt/drive/vols/win10");
        let u = RemoteUrl::parse("dir:///a/./b/../c.qcow2").unwrap();
        assert_eq!(u.to_string(), "dir:/a/c.qcow2");
        assert!(RemoteUrl::parse("dir:rel/x").unwrap().path().unwrap().is_absolute());
        assert!(matches!(RemoteUrl::parse("s3:x"), Err(UrlError::Scheme(_))));
        assert!(matches!(RemoteUrl::parse("s3://bucket"), Err(UrlError::NoName(_))));
        assert!(matches!(RemoteUrl::parse("s3://bucket/a/../b"), Err(UrlError::NoName(_))));
        assert!(matches!(RemoteUrl::parse("dir:/"), Err(UrlError::NoName(_))));
        assert!(matches!(RemoteUrl::parse("dir:"), Err(UrlError::NoName(_))));
    }

    #[test]
    fn parses_object_store_urls() {
        let u = RemoteUrl::parse("s3://vms/golden/win10").unwrap();
        assert_eq!(
            u,
            RemoteUrl::ObjStore {
                kind: StoreKind::S3,
                bucket: "vms".into(),
                parent: "golden".into(),
                name: "win10".into()
            }
        );
        assert_eq!(u.scheme(), Scheme::ObjStore);
        for s in ["s3://b/v", "gs://b/a/b/c.qcow2", "az://container/x/vol"] {
            assert_eq!(RemoteUrl::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(RemoteUrl::parse("s3://b//a/").unwrap().to_string(), "s3://b/a");
    }

    #[test]
    fn parses_gdrive_urls() {
        for s in ["gdrive:/vms/win10", "gdrive:id=0AAbc/vol", "gdrive:file=1AbC-d_e"] {
            let u = RemoteUrl::parse(s).unwrap();
            assert_eq!(u.scheme(), Scheme::GDrive);
            assert_eq!(u.to_string(), s);
        }
        assert!(matches!(RemoteUrl::parse("gdrive:/"), Err(UrlError::Drive { .. })));
        assert!(matches!(RemoteUrl::parse("gdrive:file=a/b"), Err(UrlError::Drive { .. })));
    }
}
