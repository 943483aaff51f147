//! Remote URLs: `dir:/path/NAME` names a volume folder or an object file in
//! a folder. The same syntax serves both, since a volume is a folder of
//! objects and a base image is one object in a folder.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use super::{DirRemote, DynRemote};

/// Why a URL could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("unsupported remote URL {0:?}: expected dir:/path/NAME (a folder path, local or NFS/SMB mounted)")]
    Scheme(String),
    #[error("remote URL {0:?} has no name: expected dir:/path/NAME, not a bare folder or root")]
    NoName(String),
}

/// Which backend a URL is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// A local (or network-mounted) folder.
    Dir,
}

/// A parsed remote URL: a backend, a parent folder and a name in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteUrl {
    pub scheme: Scheme,
    /// The folder holding `name` (absolute).
    pub parent: PathBuf,
    /// The last path component: a volume folder or an object's key.
    pub name: String,
}

impl RemoteUrl {
    /// Parses `dir:/path/NAME`. Relative paths are resolved against the
    /// current directory so a stored URL (a volume's base) stays valid.
    pub fn parse(s: &str) -> Result<Self, UrlError> {
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
        Ok(Self { scheme: Scheme::Dir, parent, name })
    }

    /// The full path (`parent/name`) for `dir:` URLs.
    pub fn path(&self) -> PathBuf {
        self.parent.join(&self.name)
    }

    /// A remote rooted at the folder this URL names (how a volume is opened).
    pub fn folder(&self) -> DynRemote {
        match self.scheme {
            Scheme::Dir => Arc::new(DirRemote::new(self.path())),
        }
    }

    /// A remote rooted at the parent folder and the key of the object this
    /// URL names (how a base image file is opened).
    pub fn object(&self) -> (DynRemote, String) {
        match self.scheme {
            Scheme::Dir => (Arc::new(DirRemote::new(self.parent.clone())), self.name.clone()),
        }
    }
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
        match self.scheme {
            Scheme::Dir => write!(f, "dir:{}", self.path().display()),
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
        assert_eq!(u.parent, PathBuf::from("/mnt/drive/vols"));
        assert_eq!(u.name, "win10");
        assert_eq!(u.to_string(), "dir:/mnt/drive/vols/win10");
        let u = RemoteUrl::parse("dir:///a/./b/../c.qcow2").unwrap();
        assert_eq!(u.to_string(), "dir:/a/c.qcow2");
        assert!(RemoteUrl::parse("dir:rel/x").unwrap().parent.is_absolute());
        assert!(matches!(RemoteUrl::parse("gdrive:x"), Err(UrlError::Scheme(_))));
        assert!(matches!(RemoteUrl::parse("dir:/"), Err(UrlError::NoName(_))));
        assert!(matches!(RemoteUrl::parse("dir:"), Err(UrlError::NoName(_))));
    }
}
