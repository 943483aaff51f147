//! `driveblk selftest`: checks, against a real Drive account, every Drive
//! behaviour driveblk's design relies on — the 409 fence on a reused
//! pre-generated id, that ids generated earlier still work, 206 ranged
//! reads, a revision kept forever and read by Range after its file is
//! replaced (how bases are pinned), resuming an interrupted resumable upload, files.get seeing a new
//! file at once, and how long a listing lags behind a create — so the
//! emulator's assumptions can be confirmed in one command.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use md5::{Digest, Md5};

use super::api::{q_escape, ApiError, DriveApi, ErrorKind};
use super::path::{resolve, DriveLocation, Folder};
use super::upload::{put_chunk, query_status, ChunkAnswer, CHUNK_UNIT};
use super::{api_for, DriveConfig};

/// How patient the checks are.
#[derive(Clone, Debug)]
pub struct Options {
    /// Wait this long before using an id generated at the start.
    pub id_age: Duration,
    /// Give up waiting for a listing to show a new file after this.
    pub listing_wait: Duration,
}

/// One check's outcome.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", if self.ok { "PASS" } else { "FAIL" }, self.name, self.detail)
    }
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>) -> Check {
    Check { name, ok, detail: detail.into() }
}

/// Runs every check in the folder `loc` names (created if missing); the
/// files it makes are deleted at the end.
pub async fn run(loc: &DriveLocation, cfg: &DriveConfig, opts: &Options) -> Vec<Check> {
    let api = api_for(cfg);
    let mut out = Vec::new();
    let DriveLocation::Path { root, dirs, name } = loc else {
        out.push(check(
            "folder",
            false,
            "selftest needs a folder (gdrive:/path or gdrive:id=ID/NAME), not gdrive:file=",
        ));
        return out;
    };
    let mut names = dirs.clone();
    names.push(name.clone());
    let folder = match resolve(&api, root, &names, true).await {
        Ok(Some(f)) => {
            out.push(check("folder", true, format!("{loc} is folder {}", f.id)));
            f
        }
        Ok(None) => {
            out.push(check("folder", false, format!("{loc} could not be created")));
            return out;
        }
        Err(e) => {
            out.push(check("folder", false, format!("{loc}: {e}")));
            return out;
        }
    };
    let mut made: Vec<String> = Vec::new();
    run_checks(&api, &folder, opts, &mut out, &mut made).await;
    for id in made {
        if let Err(e) = api.delete(&id).await {
            out.push(check("cleanup", false, format!("could not delete test file {id}: {e}")));
        }
    }
    out
}

fn tag_meta(id: &str, name: &str, folder: &Folder) -> serde_json::Value {
    serde_json::json!({ "id": id, "name": name, "parents": [folder.id], "appProperties": { "driveblkTag": "selftest" } })
}

async fn run_checks(api: &DriveApi, folder: &Folder, opts: &Options, out: &mut Vec<Check>, made: &mut Vec<String>) {
    let stamp = format!("{:08x}", rand::random::<u32>());
    // Two ids now: one used at once, one after a pause.
    let (early, first) = match (api.new_id().await, api.new_id().await) {
        (Ok(a), Ok(b)) => {
            out.push(check("generateIds", true, "files.generateIds returned ids"));
            (a, b)
        }
        (Err(e), _) | (_, Err(e)) => {
            out.push(check("generateIds", false, e.to_string()));
            return;
        }
    };
    let data = Bytes::from((0..1000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let name = format!("selftest-{stamp}-a");
    let created = Instant::now();
    match api.upload_simple(&tag_meta(&first, &name, folder), None, data.clone()).await {
        Ok(f) if f.id == first => {
            made.push(first.clone());
            out.push(check("create with a pre-generated id", true, format!("file {} created with the id asked", f.id)))
        }
        Ok(f) => {
            made.push(f.id.clone());
            out.push(check("create with a pre-generated id", false, format!("asked id {first}, Drive used {}", f.id)));
            return;
        }
        Err(e) => {
            out.push(check("create with a pre-generated id", false, e.to_string()));
            return;
        }
    }
    // files.get sees it at once (driveblk follows generations by id).
    match api.get_file(&first).await {
        Ok(f) => out.push(check(
            "files.get sees a new file at once",
            f.tag().as_deref() == Some("selftest"),
            format!("{} ms after the create; appProperties tag {:?}", created.elapsed().as_millis(), f.tag()),
        )),
        Err(e) => out.push(check("files.get sees a new file at once", false, e.to_string())),
    }
    // The fence: a second create with the same id must answer 409.
    match api.upload_simple(&tag_meta(&first, &format!("{name}-again"), folder), None, data.clone()).await {
        Err(e) if e.kind == ErrorKind::Conflict => {
            out.push(check("second create with the same id answers 409", true, e.to_string()))
        }
        Err(e) => out.push(check("second create with the same id answers 409", false, format!("got {e}"))),
        Ok(f) => {
            made.push(f.id.clone());
            out.push(check(
                "second create with the same id answers 409",
                false,
                format!("Drive accepted it (file {}): fencing on Drive is NOT safe", f.id),
            ))
        }
    }
    // Ranged reads.
    match api.probe_range(&first, None, 100..200).await {
        Ok((206, Some(cr), b)) if cr.starts_with("bytes 100-199/") && b.len() == 100 => {
            out.push(check("Range read answers 206", true, format!("Content-Range: {cr}")))
        }
        Ok((s, cr, b)) => out.push(check(
            "Range read answers 206",
            false,
            format!("status {s}, Content-Range {cr:?}, {} bytes", b.len()),
        )),
        Err(e) => out.push(check("Range read answers 206", false, e.to_string())),
    }
    revision_check(api, &first, &data, out).await;
    // Listing lag: how long until the new file is visible by name.
    let q = format!("name = '{}' and '{}' in parents and trashed = false", q_escape(&name), q_escape(&folder.id));
    let t0 = Instant::now();
    loop {
        match api.list(&q, folder.drive_id.as_deref()).await {
            Ok(v) if !v.is_empty() => {
                let lag = created.elapsed();
                out.push(check(
                    "listing shows a new file",
                    true,
                    format!("after {} ms (driveblk never relies on it for commits)", lag.as_millis()),
                ));
                break;
            }
            Ok(_) if t0.elapsed() < opts.listing_wait => tokio::time::sleep(Duration::from_millis(250)).await,
            Ok(_) => {
                out.push(check(
                    "listing shows a new file",
                    false,
                    format!("not listed after {} s", opts.listing_wait.as_secs()),
                ));
                break;
            }
            Err(e) => {
                out.push(check("listing shows a new file", false, e.to_string()));
                break;
            }
        }
    }
    prefix_listing_check(api, folder, &name, opts, out).await;
    // An id generated earlier, used after a pause.
    let wait = opts.id_age.saturating_sub(created.elapsed());
    tokio::time::sleep(wait).await;
    match api.upload_simple(&tag_meta(&early, &format!("selftest-{stamp}-b"), folder), None, data.clone()).await {
        Ok(f) => {
            made.push(f.id.clone());
            out.push(check(
                "ids generated earlier still work",
                f.id == early,
                format!("used {} s after it was generated", opts.id_age.as_secs()),
            ))
        }
        Err(e) => out.push(check("ids generated earlier still work", false, e.to_string())),
    }
    resumable_check(api, folder, &stamp, out, made).await;
}

/// The listing by prefix driveblk makes for generations, holds and forks
/// (`name contains 'gen-'`): Drive documents `contains` on a name as a prefix
/// match, and gc's plan of what to keep relies on it finding every key that
/// starts so, a prefix ending in `-` included.
async fn prefix_listing_check(api: &DriveApi, folder: &Folder, name: &str, opts: &Options, out: &mut Vec<Check>) {
    const NAME: &str = "listing by prefix finds a new file";
    let prefix = "selftest-";
    let q = super::listing_query(&folder.id, prefix);
    let t0 = Instant::now();
    loop {
        match api.list(&q, folder.drive_id.as_deref()).await {
            Ok(v) if v.iter().any(|f| f.name == name) => {
                return out.push(check(NAME, true, format!("`name contains '{prefix}'` lists {name}")));
            }
            Ok(_) if t0.elapsed() < opts.listing_wait => tokio::time::sleep(Duration::from_millis(250)).await,
            Ok(v) => {
                let names: Vec<&str> = v.iter().map(|f| f.name.as_str()).take(5).collect();
                return out.push(check(
                    NAME,
                    false,
                    format!("`name contains '{prefix}'` did not list {name} (it listed {names:?})"),
                ));
            }
            Err(e) => return out.push(check(NAME, false, e.to_string())),
        }
    }
}

/// A pinned base: its head revision kept forever (revisions.update), the
/// content replaced, and the pinned revision still read by Range (206,
/// the old bytes) through revisions.get `alt=media`.
async fn revision_check(api: &DriveApi, id: &str, data: &Bytes, out: &mut Vec<Check>) {
    const NAME: &str = "pinned revision kept and read by Range after a replace";
    let rev = match api.get_file(id).await.map(|f| f.head_revision_id) {
        Ok(Some(r)) => r,
        Ok(None) => return out.push(check(NAME, false, "files.get reports no headRevisionId")),
        Err(e) => return out.push(check(NAME, false, e.to_string())),
    };
    if let Err(e) = api.keep_revision(id, &rev).await {
        return out.push(check(NAME, false, format!("revisions.update keepForever: {e}")));
    }
    let other = Bytes::from(data.iter().map(|b| b ^ 0xff).collect::<Vec<u8>>());
    match api.upload_simple(&serde_json::json!({}), Some(id), other).await {
        Ok(f) if f.head_revision_id.as_deref() != Some(rev.as_str()) => {}
        Ok(_) => return out.push(check(NAME, false, "replacing the content made no new head revision")),
        Err(e) => return out.push(check(NAME, false, format!("replacing the content: {e}"))),
    }
    match api.probe_range(id, Some(&rev), 100..200).await {
        Ok((206, Some(cr), b)) if b[..] == data[100..200] => {
            out.push(check(NAME, true, format!("revision {rev}: Content-Range {cr}, the pinned bytes")))
        }
        Ok((s, cr, b)) => out.push(check(
            NAME,
            false,
            format!(
                "status {s}, Content-Range {cr:?}, {} bytes, pinned bytes: {}",
                b.len(),
                b.len() == 100 && b[..] == data[100..200]
            ),
        )),
        Err(e) => out.push(check(NAME, false, format!("revisions.get alt=media: {e}"))),
    }
}

/// Starts a resumable upload, sends one 256 KiB chunk, asks the session
/// where it is (as after a failure), then finishes, and compares md5.
async fn resumable_check(api: &DriveApi, folder: &Folder, stamp: &str, out: &mut Vec<Check>, made: &mut Vec<String>) {
    const NAME: &str = "resumable upload resumes";
    let total = CHUNK_UNIT + 1000;
    let data = Bytes::from((0..total).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
    let meta = serde_json::json!({ "name": format!("selftest-{stamp}-c"), "parents": [folder.id] });
    let r: Result<String, ApiError> = async {
        let uri = api.start_resumable(&meta, None, Some(total)).await?;
        let first = put_chunk(api, &uri, 0, data.slice(..CHUNK_UNIT as usize), Some(total)).await?;
        let ChunkAnswer::Continue(n) = first else { return Ok("the first chunk finished the upload".into()) };
        if n != CHUNK_UNIT {
            return Ok(format!("after the first chunk the session reported {n} bytes, not {CHUNK_UNIT}"));
        }
        let ChunkAnswer::Continue(m) = query_status(api, &uri, Some(total)).await? else {
            return Ok("the status query did not answer 308".into());
        };
        if m > total {
            return Ok(format!("the status query reported {m} bytes of a {total}-byte upload"));
        }
        let rest = data.slice(m as usize..);
        match put_chunk(api, &uri, m, rest, Some(total)).await? {
            ChunkAnswer::Done(f) => {
                made.push(f.id.clone());
                let md5 = hex::encode(Md5::digest(&data));
                if f.md5_checksum.as_deref() == Some(md5.as_str()) && f.size() == total {
                    Ok(String::new())
                } else {
                    Ok(format!("finished with size {} md5 {:?}, expected {total} {md5}", f.size(), f.md5_checksum))
                }
            }
            _ => Ok("the last chunk did not finish the upload".into()),
        }
    }
    .await;
    match r {
        Ok(problem) if problem.is_empty() => {
            out.push(check(NAME, true, "308 with Range after a chunk, status query `bytes */N`, resumed, md5 matches"))
        }
        Ok(problem) => out.push(check(NAME, false, problem)),
        Err(e) => out.push(check(NAME, false, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::gdrive::test_http::{scripted, session};

    /// A status answer past the upload's end fails the check instead of
    /// slicing past the data.
    #[tokio::test]
    async fn gdrive_selftest_resume_check_survives_a_range_past_the_end() {
        let (api, _) = scripted(vec![
            session("one"),
            (308, vec![("Range", format!("bytes=0-{}", CHUNK_UNIT - 1))], String::new()),
            (308, vec![("Range", "bytes=0-99999999".into())], String::new()),
        ])
        .await;
        let folder = Folder { id: "root".into(), drive_id: None };
        let (mut out, mut made) = (Vec::new(), Vec::new());
        resumable_check(&api, &folder, "t", &mut out, &mut made).await;
        assert_eq!(out.len(), 1);
        assert!(!out[0].ok && out[0].detail.contains("100000000"), "{}", out[0]);
    }
}
