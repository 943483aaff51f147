//! Small named objects stored beside a volume's chunks and manifests (the
//! VM definition `vm.toml`): read and written whole, never part of a
//! generation.

use super::{runtime, RemoteOptions, VolumeError, VolumeReader, VolumeResult};
use crate::remote::{PutBody, RemoteUrl};

/// Names a sidecar may have: plain file names that no volume object uses.
fn check_name(name: &str) -> VolumeResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !name.starts_with('.')
        && !["volume.json", "manifest"].contains(&name)
        && !name.starts_with("gen-")
        && !name.starts_with("pack-")
        && !name.starts_with("profile-");
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidOptions(format!("{name:?} cannot name an object stored beside a volume")))
    }
}

/// The sidecar `name` of the volume at `url`, or None if it has none.
pub fn read(url: &str, name: &str, opts: &RemoteOptions) -> VolumeResult<Option<Vec<u8>>> {
    check_name(name)?;
    let u = RemoteUrl::parse(url)?;
    let rt = runtime("driveblk-sidecar")?;
    let r = rt.block_on(VolumeReader::open(&u, opts))?;
    match rt.block_on(r.remote.get(name)) {
        Ok(b) => Ok(Some(b.to_vec())),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(VolumeError::remote(format!("reading {url}/{name}"), e)),
    }
}

/// The sidecar `name` through an already open remote (the volume's
/// folder), or None.
pub async fn read_from(remote: &crate::remote::DynRemote, name: &str) -> VolumeResult<Option<Vec<u8>>> {
    check_name(name)?;
    match remote.get(name).await {
        Ok(b) => Ok(Some(b.to_vec())),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(VolumeError::remote(format!("reading {name}"), e)),
    }
}

/// Stores `data` as the sidecar `name` of the volume at `url` (replacing
/// it only when `replace`).
pub fn write(url: &str, name: &str, data: Vec<u8>, replace: bool, opts: &RemoteOptions) -> VolumeResult<()> {
    check_name(name)?;
    let u = RemoteUrl::parse(url)?;
    let rt = runtime("driveblk-sidecar")?;
    let r = rt.block_on(VolumeReader::open(&u, opts))?;
    match rt.block_on(r.remote.head(name)) {
        Ok(_) if !replace => {
            return Err(VolumeError::InvalidOptions(format!("{url} already has {name} (--force replaces it)")))
        }
        Ok(_) => {
            rt.block_on(r.remote.delete(name)).map_err(|e| VolumeError::remote(format!("replacing {url}/{name}"), e))?
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(VolumeError::remote(format!("checking {url}/{name}"), e)),
    }
    rt.block_on(r.remote.put(name, PutBody::from_bytes(data)))
        .map_err(|e| VolumeError::remote(format!("writing {url}/{name}"), e))?;
    Ok(())
}
