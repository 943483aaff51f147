//! `adopt`: copies a volume's base image into the volume's own folder
//! (server-side on Drive, `files.copy`; by download and upload elsewhere)
//! and commits a generation naming the copy, so the volume no longer
//! depends on the original file. The header stays as written: the copy is
//! a generation-level fact (`Manifest::base_copy`).

use bytes::Bytes;

use super::commit::writer_record;
use super::format::{gen_key, BaseCopy, Manifest};
use super::reader::{BaseFile, VolumeReader};
use super::{runtime, RemoteOptions, VolumeError, VolumeInfo, VolumeResult};
use crate::remote::gdrive::GDriveRemote;
use crate::remote::{content_tag, DynRemote, ObjectMeta, PutBody, RemoteError, RemoteUrl, Slot};

/// Bytes per ranged read when a copy has to go through this host.
const COPY_PIECE: u64 = 8 << 20;

/// Copies the base of the volume at `url` into its folder and commits a
/// generation that reads base chunks from the copy. A volume adopted
/// already is left as it is. Run it while no daemon serves the volume
/// (it commits a generation, like a second writer would).
pub fn adopt(url: &str, opts: &RemoteOptions) -> VolumeResult<VolumeInfo> {
    let u = RemoteUrl::parse(url)?;
    let rt = runtime("driveblk-adopt")?;
    rt.block_on(async {
        let r = VolumeReader::open(&u, opts).await?;
        let url_s = r.url.clone();
        let Some(b) = r.header.base.clone() else {
            return Err(VolumeError::InvalidOptions(format!("volume {url_s} has no base image; there is nothing to adopt")));
        };
        let m = r.manifest();
        if m.base_copy.is_some() {
            return Ok(VolumeInfo::from_reader(&r));
        }
        // A copy keeps the base's bytes as they are (`base-*` is read as
        // plaintext): into an encrypted volume on another store it would
        // hand that store's operator the whole image in clear.
        if r.key.is_some() && !same_store(&b.url, &u) {
            return Err(VolumeError::InvalidOptions(format!(
                "volume {url_s} is encrypted and its base {} is on another store: a copy would put the whole image, \
                 unencrypted, into {url_s}'s folder; keep the volume attached to its base, or import the image \
                 encrypted (`driveblk export {url_s} FILE`, then `driveblk import --encrypt FILE NEWURL`)",
                b.url
            )));
        }
        let base = r.base.as_ref().expect("a volume with a base opens with one");
        let g = m.generation + 1;
        let key = format!("base-{g:020}");
        let slot = r.remote.reserve(&key).await.map_err(|e| VolumeError::remote(format!("reserving {url_s}/{key}"), e))?;
        let (copied, server_side) = copy_base(&r.remote, base, &b.url, &u, &key, slot.as_ref(), opts).await?;
        // A copy made by upload got an id of the backend's choosing.
        let slot = if server_side { slot } else { None };
        // The copy must hold the pinned bytes, not whatever the file holds now.
        if copied.size != b.size || (copied.md5.is_some() && b.md5.is_some() && copied.md5 != b.md5) {
            let _ = r.remote.delete(&key).await;
            return Err(VolumeError::BaseChanged {
                url: url_s,
                base: b.url.clone(),
                what: format!(
                    "the copy holds {} bytes (md5 {:?}), the pinned base {} (md5 {:?}); it was replaced while copying — run adopt again",
                    copied.size, copied.md5, b.size, b.md5
                ),
            });
        }
        let mut delta = Manifest::new(&r.header, g);
        delta.parent = Some(m.generation);
        delta.image_len = m.image_len;
        delta.base_copy = Some(BaseCopy { key: key.clone(), slot: slot.clone(), size: copied.size, md5: copied.md5.clone() });
        if let Some(s) = &slot {
            delta.ids.insert(key.clone(), s.clone());
        }
        let next = gen_key(g + 1);
        delta.next_slot =
            r.remote.reserve(&next).await.map_err(|e| VolumeError::remote(format!("reserving {url_s}/{next}"), e))?;
        delta.writer = Some(writer_record("adopt"));
        let bytes = delta.to_bytes();
        let gkey = gen_key(g);
        let tag = content_tag(&bytes);
        match r.remote.create(&gkey, m.next_slot.as_ref(), &tag, PutBody::from_bytes(bytes)).await {
            Ok(_) => {}
            Err(e) if matches!(e.root(), RemoteError::AlreadyExists { .. }) => {
                // Another writer's generation: nothing references the copy.
                let _ = r.remote.delete(&key).await;
                return Err(VolumeError::Conflict { url: url_s, generation: g, by: "another writer".into() });
            }
            Err(e) => {
                // The commit may have landed with its reply lost: the copy
                // goes only if the generation is certainly not there.
                match r.remote.get_created(&gkey, m.next_slot.as_ref()).await {
                    Ok(b) if content_tag(&b) == tag => {}
                    Ok(_) => {
                        let _ = r.remote.delete(&key).await;
                        return Err(VolumeError::Conflict { url: url_s, generation: g, by: "another writer".into() });
                    }
                    Err(g) if g.is_not_found() => {
                        let _ = r.remote.delete(&key).await;
                        return Err(VolumeError::remote(format!("committing {url_s}/{gkey}"), e));
                    }
                    _ => return Err(VolumeError::remote(format!("committing {url_s}/{gkey}"), e)),
                }
            }
        }
        let r = VolumeReader::open(&u, opts).await?;
        Ok(VolumeInfo::from_reader(&r))
    })
}

/// Whether the base at `base_url` is on the same store as the volume at
/// `vol`, so one operator sees both (Google Drive; one bucket; one file
/// system): a plaintext copy of the base then shows that operator nothing
/// new.
fn same_store(base_url: &str, vol: &RemoteUrl) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (RemoteUrl::parse(base_url), vol) {
        (Ok(RemoteUrl::GDrive(_)), RemoteUrl::GDrive(_)) => true,
        (Ok(RemoteUrl::ObjStore { kind: a, bucket: x, .. }), RemoteUrl::ObjStore { kind: b, bucket: y, .. }) => {
            a == *b && x == *y
        }
        (Ok(RemoteUrl::Dir { parent: a, .. }), RemoteUrl::Dir { parent: b, .. }) => {
            match (std::fs::metadata(&a), std::fs::metadata(b)) {
                (Ok(x), Ok(y)) => x.dev() == y.dev(),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Copies the base into the volume folder as `key`: server-side when both
/// are on Drive and the file still holds the pinned revision, else by
/// reading the pinned bytes and uploading them.
async fn copy_base(
    remote: &DynRemote,
    base: &BaseFile,
    base_url: &str,
    vol: &RemoteUrl,
    key: &str,
    slot: Option<&Slot>,
    opts: &RemoteOptions,
) -> VolumeResult<(ObjectMeta, bool)> {
    let ctx = |what: &str| format!("adopting base {base_url} into {vol}/{key}: {what}");
    if let (Ok(RemoteUrl::GDrive(bloc)), RemoteUrl::GDrive(vloc), Some(slot)) = (RemoteUrl::parse(base_url), vol, slot)
    {
        let head = base.remote.head(&base.key).await.map_err(|e| VolumeError::remote(ctx("reading the base"), e))?;
        if base.revision.is_none() || head.revision == base.revision {
            let (src, skey) = GDriveRemote::object(&bloc, &opts.config.drive);
            let dest = GDriveRemote::folder(vloc, &opts.config.drive);
            let mut attempt = 0u32;
            loop {
                match src.copy_to(&skey, &dest, key, &slot.0).await {
                    Ok(m) => return Ok((m, true)),
                    Err(e) if e.is_retryable() && attempt + 1 < opts.retry.max_attempts.max(1) => {
                        let d = opts.retry.base_delay.saturating_mul(1 << attempt.min(10)).min(opts.retry.max_delay);
                        tracing::debug!(error = %e, "files.copy failed; retrying");
                        tokio::time::sleep(d).await;
                        attempt += 1;
                    }
                    Err(e) => return Err(VolumeError::remote(ctx("files.copy"), e)),
                }
            }
        }
        tracing::info!("the base was replaced since attach: copying its pinned revision through this host");
    }
    let (src, skey, rev, size) = (base.remote.clone(), base.key.clone(), base.revision.clone(), base.size);
    let body = PutBody::from_stream_fn(Some(size), move || {
        let (src, skey, rev) = (src.clone(), skey.clone(), rev.clone());
        Box::pin(futures::stream::unfold((0u64, false), move |(pos, failed)| {
            let (src, skey, rev) = (src.clone(), skey.clone(), rev.clone());
            async move {
                if failed || pos >= size {
                    return None;
                }
                let end = (pos + COPY_PIECE).min(size);
                let r: Result<Bytes, RemoteError> = match &rev {
                    Some(rev) => src.get_range_revision(&skey, rev, pos..end).await,
                    None => src.get_range(&skey, pos..end).await,
                };
                match r {
                    Ok(b) if b.len() as u64 == end - pos => Some((Ok(b), (end, false))),
                    Ok(b) => Some((
                        Err(std::io::Error::other(format!("base read {pos}..{end} returned {} bytes", b.len()))),
                        (end, true),
                    )),
                    Err(e) => Some((Err(std::io::Error::other(e.to_string())), (end, true))),
                }
            }
        }))
    });
    remote.put(key, body).await.map_err(|e| VolumeError::remote(ctx("upload"), e))?;
    let m = remote.head(key).await.map_err(|e| VolumeError::remote(ctx("checking the copy"), e))?;
    Ok((m, false))
}
