//! Resumable uploads (Drive's protocol): a session, then chunks of a
//! multiple of 256 KiB with `Content-Range`; after a failed chunk, ask the
//! session how much it has (`bytes */N`, answered by 308 + `Range`) and go
//! on from there; a session that answers a 4xx (404: expired) starts over.
//! Retries live
//! here, not in the retry wrapper, so a lost chunk costs one chunk, not
//! the whole body. The md5 Drive reports is checked against what was sent.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use md5::{Digest, Md5};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::{Method, StatusCode};

use super::api::{ApiError, DriveApi, DriveFile, ErrorKind};
use crate::remote::PutBody;

/// Drive's chunk granularity.
pub const CHUNK_UNIT: u64 = 256 << 10;

/// How many times a session is started afresh (a 4xx: session spent)
/// before the upload gives up.
const MAX_SESSIONS: u32 = 3;

/// The chunk size actually used: `want` rounded down to a multiple of
/// 256 KiB, at least 256 KiB.
pub fn chunk_size(want: u64) -> u64 {
    (want / CHUNK_UNIT).max(1) * CHUNK_UNIT
}

/// `Content-Range` of a chunk `[start, start+len)` of a body of `total`
/// bytes (`None`: not known yet).
pub fn chunk_content_range(start: u64, len: u64, total: Option<u64>) -> String {
    let total = total.map_or("*".to_string(), |t| t.to_string());
    if len == 0 {
        format!("bytes */{total}")
    } else {
        format!("bytes {}-{}/{total}", start, start + len - 1)
    }
}

/// The next byte a session wants, from a 308's `Range: bytes=0-N` (no
/// header: nothing received yet).
pub fn next_offset(range: Option<&str>) -> Option<u64> {
    match range {
        None => Some(0),
        Some(r) => {
            let r = r.trim().strip_prefix("bytes=")?;
            let (_, end) = r.split_once('-')?;
            end.trim().parse::<u64>().ok()?.checked_add(1)
        }
    }
}

/// What one chunk request (or status query) got back.
pub(crate) enum ChunkAnswer {
    Done(Box<DriveFile>),
    /// 308: the session has everything before this offset.
    Continue(u64),
    /// A 4xx (404: expired): the session is spent; the error says why.
    SessionGone(ApiError),
}

/// How a session ended.
enum SessionEnd {
    /// The file and the hex md5 of what was sent.
    Done(Box<(DriveFile, String)>),
    /// Spent: start a new one.
    Gone(ApiError),
}

/// Uploads `body` as a new file with `meta` or as the new content of
/// `existing`. Returns the file and the hex md5 of what was sent.
pub async fn resumable(
    api: &DriveApi,
    meta: &serde_json::Value,
    existing: Option<&str>,
    body: &PutBody,
) -> Result<(DriveFile, String), ApiError> {
    let chunk = chunk_size(api.cfg.chunk_size);
    let mut why = ApiError::new(ErrorKind::Transient, "no upload session");
    for session in 0..MAX_SESSIONS {
        if session > 0 {
            tracing::info!(session, error = %why, "Drive upload session spent; starting the upload over");
        }
        // A session that cannot be started has sent no data: its error
        // goes back as it is (transient ones to the retry wrapper).
        let uri = api.start_resumable(meta, existing, body.len()).await?;
        match run_session(api, &uri, body, chunk).await? {
            SessionEnd::Done(done) => return Ok(*done),
            SessionEnd::Gone(e) => why = e,
        }
    }
    // Fatal whatever the last 4xx was (a 404 here is no missing file).
    let message = format!("{MAX_SESSIONS} upload sessions ended early, the last with: {}", why.message);
    Err(give_up(ApiError { kind: ErrorKind::Fatal, message, ..why }))
}

/// The error an upload ends with once its own retries are spent: not
/// retryable, so the retry wrapper does not start it all over again.
fn give_up(e: ApiError) -> ApiError {
    let kind = if e.kind == ErrorKind::Transient { ErrorKind::GaveUp } else { e.kind };
    ApiError { kind, message: format!("upload gave up after its own retries: {}", e.message), ..e }
}

async fn backoff(api: &DriveApi, attempt: u32, e: &ApiError) {
    let exp = api.cfg.upload_backoff.saturating_mul(1 << attempt.min(5)).min(Duration::from_secs(16));
    let jitter = Duration::from_millis(rand::random::<u64>() % (exp.as_millis() as u64 / 4 + 1));
    let d = (exp + jitter).max(e.retry_after.unwrap_or_default());
    tracing::debug!(delay_ms = d.as_millis() as u64, error = %e, "Drive upload chunk failed; resuming after a pause");
    tokio::time::sleep(d).await;
}

/// Sends the whole body through one session.
async fn run_session(api: &DriveApi, uri: &str, body: &PutBody, chunk: u64) -> Result<SessionEnd, ApiError> {
    let declared = body.len();
    let mut stream = body.stream();
    let mut md5 = Md5::new();
    let mut read = 0u64; // bytes taken from the stream
    let mut eof = false;
    let mut buf = BytesMut::new(); // bytes [buf_start, read)
    let mut buf_start = 0u64;
    let mut acked = 0u64; // the session has [0, acked)
    let mut failures = 0u32;
    loop {
        if acked < buf_start {
            // The session lost bytes we no longer hold: start over.
            return Ok(SessionEnd::Gone(ApiError::new(
                ErrorKind::Transient,
                format!("the session has {acked} bytes, the upload no longer holds those from there"),
            )));
        }
        buf.advance((acked - buf_start) as usize);
        buf_start = acked;
        while (buf.len() as u64) < chunk && !eof {
            match stream.next().await {
                Some(Ok(b)) => {
                    md5.update(&b);
                    read += b.len() as u64;
                    buf.extend_from_slice(&b);
                }
                Some(Err(e)) => {
                    return Err(ApiError::new(ErrorKind::Fatal, format!("reading the upload's body: {e}")));
                }
                None => eof = true,
            }
        }
        if !eof && declared == Some(read) {
            // The declared length is in: the stream must end here (a body
            // in pieces larger than a chunk reaches it before saying so),
            // so the last chunk goes out as the last.
            match stream.next().await {
                None => eof = true,
                Some(Ok(b)) => {
                    md5.update(&b);
                    read += b.len() as u64;
                    buf.extend_from_slice(&b);
                    eof = b.is_empty() && stream.next().await.is_none();
                }
                Some(Err(e)) => {
                    return Err(ApiError::new(ErrorKind::Fatal, format!("reading the upload's body: {e}")));
                }
            }
        }
        if let Some(n) = declared {
            if read > n || (eof && read != n) {
                return Err(ApiError::new(
                    ErrorKind::Fatal,
                    format!("upload body has {read} bytes, {n} were declared"),
                ));
            }
        }
        let last = eof && buf.len() as u64 <= chunk;
        let send = if last { buf.len() as u64 } else { chunk };
        let total = if last { Some(read) } else { declared };
        let data = Bytes::copy_from_slice(&buf[..send as usize]);
        let sent_end = buf_start + send;
        let answer = put_chunk(api, uri, buf_start, data, total).await;
        // Whether the answer is the chunk's own (not a status query's
        // after a failure, which the failure already counted).
        let mut direct = true;
        let answer = match answer {
            Ok(a) => a,
            Err(e) if e.kind == ErrorKind::Transient && failures + 1 < api.cfg.upload_attempts => {
                failures += 1;
                direct = false;
                backoff(api, failures - 1, &e).await;
                match query_status(api, uri, total).await {
                    Ok(a) => a,
                    Err(e2) if e2.kind == ErrorKind::Transient => continue_with(acked),
                    Err(e2) => return Err(e2),
                }
            }
            Err(e) if e.kind == ErrorKind::Transient => return Err(give_up(e)),
            Err(e) => return Err(e),
        };
        match answer {
            ChunkAnswer::Done(f) => {
                let sent = hex::encode(md5.clone().finalize());
                if !eof {
                    // Drive finished before we sent everything: only
                    // possible if it miscounted; never accept a prefix.
                    return Err(ApiError::new(ErrorKind::Fatal, "Drive closed the upload before its end"));
                }
                check_landed(&f, read, &sent)?;
                return Ok(SessionEnd::Done(Box::new((*f, sent))));
            }
            // A `Range` past the last byte sent is no count of ours (a
            // broken server or proxy): the buffer cannot skip bytes it never
            // sent, so the retry wrapper starts the upload over.
            ChunkAnswer::Continue(n) if n > sent_end => {
                return Err(ApiError::new(
                    ErrorKind::Transient,
                    format!("Drive says the upload session holds {n} bytes, but only {sent_end} were sent"),
                ));
            }
            ChunkAnswer::Continue(n) => {
                if n > acked {
                    failures = 0;
                } else if direct {
                    // A 308 that took none of the chunk ("do not assume that
                    // the server received all bytes sent", upload guide): sent
                    // again after a pause, as many times as a failed chunk, so
                    // a session (or a proxy dropping `Range`) that never moves
                    // ends the upload instead of resending it for ever.
                    let e = ApiError::new(
                        ErrorKind::Transient,
                        format!("Drive answered 308 with the session still at byte {n}: the chunk was not taken"),
                    );
                    failures += 1;
                    if failures >= api.cfg.upload_attempts {
                        return Err(give_up(e));
                    }
                    backoff(api, failures - 1, &e).await;
                }
                acked = n;
            }
            ChunkAnswer::SessionGone(e) => return Ok(SessionEnd::Gone(e)),
        }
    }
}

fn continue_with(acked: u64) -> ChunkAnswer {
    ChunkAnswer::Continue(acked)
}

/// Compares what Drive stored with what was sent.
pub fn check_landed(f: &DriveFile, len: u64, md5_hex: &str) -> Result<(), ApiError> {
    if f.size.is_some() && f.size() != len {
        return Err(ApiError::new(
            ErrorKind::Fatal,
            format!("Drive stored {} bytes of a {len}-byte upload (file {})", f.size(), f.id),
        ));
    }
    if let Some(m) = &f.md5_checksum {
        if !m.eq_ignore_ascii_case(md5_hex) {
            return Err(ApiError::new(
                ErrorKind::Fatal,
                format!("Drive's md5 {m} of file {} differs from the uploaded bytes' {md5_hex}", f.id),
            ));
        }
    }
    Ok(())
}

pub(crate) async fn put_chunk(
    api: &DriveApi,
    uri: &str,
    start: u64,
    data: Bytes,
    total: Option<u64>,
) -> Result<ChunkAnswer, ApiError> {
    let cr = chunk_content_range(start, data.len() as u64, total);
    // Paced on the wire (a retried chunk again); the deadline allows for
    // the pacing.
    let turn = api.cfg.bwlimit.upload(data.len() as u64).await;
    let t = api.timeout_for(data.len() as u64) + turn.duration();
    let resp = api
        .send(
            |tok| {
                api.http_up()
                    .request(Method::PUT, uri)
                    .bearer_auth(tok)
                    .timeout(t)
                    .header(CONTENT_RANGE, cr.as_str())
                    .header(CONTENT_LENGTH, data.len())
                    .body(api.sent.body(&turn, data.clone()))
            },
            accept_chunk,
            true,
        )
        .await;
    chunk_answer(api, resp).await
}

/// Asks the session how much it has.
pub(crate) async fn query_status(api: &DriveApi, uri: &str, total: Option<u64>) -> Result<ChunkAnswer, ApiError> {
    let cr = chunk_content_range(0, 0, total);
    let t = api.cfg.request_timeout;
    let resp = api
        .send(
            |tok| {
                api.http()
                    .request(Method::PUT, uri)
                    .bearer_auth(tok)
                    .timeout(t)
                    .header(CONTENT_RANGE, cr.as_str())
                    .header(CONTENT_LENGTH, 0)
            },
            accept_chunk,
            true,
        )
        .await;
    chunk_answer(api, resp).await
}

fn accept_chunk(s: StatusCode) -> bool {
    s.is_success() || s.as_u16() == 308
}

/// "For any 4xx errors (including 403) during a resumable upload, restart
/// the upload" (Drive's manage-uploads guide; 404 is the expired session).
/// Not those a new session cannot help: rate limits and 408 are waited out
/// and resumed (transient), a quota or credentials error is reported as it
/// is, and a 409 means the pre-generated id is taken.
fn spends_session(e: &ApiError) -> bool {
    matches!(e.status, Some(400..=499))
        && !matches!(e.kind, ErrorKind::Transient | ErrorKind::Quota | ErrorKind::Auth | ErrorKind::Conflict)
}

async fn chunk_answer(api: &DriveApi, resp: Result<reqwest::Response, ApiError>) -> Result<ChunkAnswer, ApiError> {
    let resp = match resp {
        Ok(r) => r,
        Err(e) if spends_session(&e) => return Ok(ChunkAnswer::SessionGone(e)),
        Err(e) => return Err(e),
    };
    if resp.status().as_u16() == 308 {
        let range = resp.headers().get(RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
        return next_offset(range.as_deref())
            .map(ChunkAnswer::Continue)
            .ok_or_else(|| ApiError::new(ErrorKind::Transient, format!("308 with a bad Range {range:?}")));
    }
    let bytes = resp.bytes().await.map_err(|e| api.transport(e))?;
    serde_json::from_slice(&bytes)
        .map(|f| ChunkAnswer::Done(Box::new(f)))
        .map_err(|e| ApiError::new(ErrorKind::Transient, format!("unreadable answer to the last chunk: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::gdrive::test_http::{google_error, landed, scripted, session};

    /// manage-uploads: "For any 4xx errors (including 403) during a
    /// resumable upload, restart the upload" with a new session URI.
    #[tokio::test]
    async fn gdrive_upload_restarts_the_session_after_a_4xx_on_a_chunk() {
        let data = vec![7u8; 1000];
        let (api, seen) = scripted(vec![
            session("one"),
            google_error(400, "badRequest", "Failed to parse Content-Range header."),
            session("two"),
            landed(&data),
        ])
        .await;
        let body = PutBody::from_bytes(data.clone());
        let (f, _) = resumable(&api, &serde_json::json!({"name": "x"}), None, &body).await.expect("upload");
        assert_eq!(f.id, "f1");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(seen[0].starts_with("POST /upload/drive/v3/files?uploadType=resumable"), "{seen:?}");
        assert!(seen[1].starts_with("PUT ") && seen[1].contains("upload_id=one"), "{seen:?}");
        assert!(seen[2].starts_with("POST "), "{seen:?}");
        assert!(seen[3].contains("upload_id=two") && seen[3].ends_with("bytes 0-999/1000"), "{seen:?}");
    }

    /// A quota error on a chunk is reported at once, not restarted.
    #[tokio::test]
    async fn gdrive_upload_quota_error_on_a_chunk_is_final() {
        let (api, seen) = scripted(vec![
            session("one"),
            google_error(403, "storageQuotaExceeded", "The user's Drive storage quota has been exceeded."),
        ])
        .await;
        let body = PutBody::from_bytes(vec![1u8; 1000]);
        let e = resumable(&api, &serde_json::json!({}), None, &body).await.unwrap_err();
        assert_eq!((e.kind, e.status), (ErrorKind::Quota, Some(403)));
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    /// A 308 whose `Range` covers bytes never sent is refused, not followed.
    #[tokio::test]
    async fn gdrive_upload_refuses_a_range_past_the_bytes_sent() {
        let (api, _) =
            scripted(vec![session("one"), (308, vec![("Range", "bytes=0-999999".into())], String::new())]).await;
        let body = PutBody::from_bytes(vec![2u8; 3 * CHUNK_UNIT as usize]);
        let e = resumable(&api, &serde_json::json!({}), None, &body).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{e}");
        assert!(e.message.contains("holds 1000000 bytes, but only 262144"), "{e}");
    }

    #[test]
    fn gdrive_chunks_are_multiples_of_256k() {
        assert_eq!(chunk_size(8 << 20), 8 << 20);
        assert_eq!(chunk_size(1), CHUNK_UNIT);
        assert_eq!(chunk_size(CHUNK_UNIT * 3 + 5), CHUNK_UNIT * 3);
        assert_eq!(chunk_content_range(0, 262144, Some(1000000)), "bytes 0-262143/1000000");
        assert_eq!(chunk_content_range(262144, 10, None), "bytes 262144-262153/*");
        assert_eq!(chunk_content_range(0, 0, Some(7)), "bytes */7");
        assert_eq!(next_offset(None), Some(0));
        assert_eq!(next_offset(Some("bytes=0-262143")), Some(262144));
        assert_eq!(next_offset(Some("junk")), None);
        assert_eq!(next_offset(Some("bytes=0-18446744073709551615")), None);
    }

    /// A 1000-byte resumable upload (two chunk attempts) to a server that
    /// opens a session and answers every chunk with `chunk_reply`
    /// (status, headers): the error it ends with, and the config.
    async fn upload_against(
        chunk_reply: (&'static str, Vec<(&'static str, String)>),
    ) -> (ApiError, crate::remote::config::DriveConfig) {
        use super::super::test_http::{response, serve, Reply};
        use crate::remote::config::{DriveConfig, DriveCredentials};
        let session = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
        let s = session.clone();
        let base = serve(move |r| {
            Reply::Raw(if r.method == "POST" {
                response("200 OK", &[("Location", s.get().cloned().unwrap_or_default())], b"")
            } else {
                let headers: Vec<(&str, String)> = chunk_reply.1.clone();
                response(chunk_reply.0, &headers, b"")
            })
        })
        .await;
        session.set(format!("{base}/session")).unwrap();
        let cfg = DriveConfig {
            api_url: base,
            credentials: DriveCredentials::StaticToken("t".into()),
            upload_attempts: 2,
            upload_backoff: Duration::from_millis(1),
            ..Default::default()
        };
        let api = DriveApi::new(&cfg);
        let body = PutBody::from_bytes(vec![7u8; 1000]);
        (resumable(&api, &serde_json::json!({"name": "x"}), None, &body).await.unwrap_err(), cfg)
    }

    /// A session that claims more bytes than were sent (a broken proxy,
    /// a hostile server) fails the upload with a retryable error naming
    /// both counts, instead of panicking on the upload buffer.
    #[tokio::test]
    async fn gdrive_upload_refuses_a_session_ahead_of_the_sender() {
        let (e, _) = upload_against(("308 Resume Incomplete", vec![("Range", "bytes=0-99999".to_string())])).await;
        assert_eq!(e.kind, ErrorKind::Transient, "{e}");
        assert!(e.message.contains("holds 100000 bytes, but only 1000"), "{e}");
    }

    /// A session that answers every chunk with 308 and no `Range` (it took
    /// none of it, or a proxy drops the header) ends the upload after the
    /// chunk's attempts, retryable later, instead of resending the same
    /// chunk for ever without a pause.
    #[tokio::test]
    async fn gdrive_upload_ends_when_the_session_never_moves() {
        let r = tokio::time::timeout(Duration::from_secs(20), upload_against(("308 Resume Incomplete", vec![]))).await;
        let (e, _) = r.expect("the upload resent its chunk for ever");
        assert_eq!(e.kind, ErrorKind::GaveUp, "{e}");
        assert!(e.message.contains("the chunk was not taken"), "{e}");
    }

    /// An upload whose chunks keep failing (an outage longer than its own
    /// resumes) gives up as an outage already retried through: the retry
    /// wrapper does not restart it from byte 0, and write-back retries it
    /// later without calling it a pause for a person to act on.
    #[tokio::test]
    async fn gdrive_an_upload_given_up_is_an_outage_not_a_pause() {
        let (e, cfg) = upload_against(("503 Service Unavailable", vec![])).await;
        assert_eq!(e.kind, ErrorKind::GaveUp, "{e}");
        let remote = crate::remote::gdrive::GDriveRemote::folder(
            &crate::remote::gdrive::path::DriveLocation::parse("/v").unwrap(),
            &cfg,
        );
        let r = remote.err("put", "pack-1", e);
        assert!(!r.is_retryable() && !r.is_pause(), "{r}");
    }

    #[test]
    fn gdrive_landed_upload_is_checked() {
        let f = DriveFile {
            id: "x".into(),
            size: Some("3".into()),
            md5_checksum: Some("ABC".into()),
            ..Default::default()
        };
        assert!(check_landed(&f, 3, "abc").is_ok());
        assert!(check_landed(&f, 4, "abc").is_err());
        assert!(check_landed(&f, 3, "abd").is_err());
    }
}
