//! Remote errors: one enum whose variants say whether retrying can help, so
//! the retry wrapper classifies without knowing the backend.

use std::io;

/// Result alias for remote operations.
pub type RemoteResult<T> = Result<T, RemoteError>;

/// Why a remote operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The object does not exist. Never retried.
    #[error("{remote}: object {key:?} not found")]
    NotFound { remote: String, key: String },

    /// An I/O error from the backend; retryable or not by its kind
    /// (timeouts and resets are, permission errors are not).
    #[error("{remote}: {op} {key:?}: {source}")]
    Io {
        remote: String,
        op: &'static str,
        key: String,
        #[source]
        source: io::Error,
    },

    /// A failure the backend says is temporary (rate limit, 5xx, injected
    /// fault). Retried.
    #[error("{remote}: {op} {key:?}: temporary failure: {message}")]
    Transient {
        remote: String,
        op: &'static str,
        key: String,
        message: String,
        /// How long the server asked us to wait (HTTP `Retry-After`).
        retry_after: Option<std::time::Duration>,
    },

    /// A failure retrying cannot fix (quota exceeded, no permission, bad
    /// request). Not retried.
    #[error("{remote}: {op} {key:?}: {message}")]
    Fatal { remote: String, op: &'static str, key: String, message: String },

    /// [`Remote::create`](super::Remote::create) found the object already
    /// created. `tag` is the existing object's tag when the backend knows
    /// it: equal to the caller's means the caller's own earlier attempt
    /// landed. Never retried.
    #[error("{remote}: {key:?} already exists")]
    AlreadyExists { remote: String, key: String, tag: Option<String> },

    /// The remote refuses to store more (Drive `storageQuotaExceeded`, the
    /// daily upload cap) or to serve more (`downloadQuotaExceeded`). Not
    /// retried by the wrapper: write-back pauses and tries again later,
    /// while the guest runs on.
    #[error("{remote}: {op} {key:?}: quota exceeded: {message}")]
    Quota { remote: String, op: &'static str, key: String, message: String },

    /// The credentials no longer work (revoked or expired grant, a bad
    /// key). Not retried; write-back pauses until they are fixed. The
    /// message never contains a secret.
    #[error("{remote}: {op} {key:?}: not authorised: {message}")]
    Auth { remote: String, op: &'static str, key: String, message: String },

    /// The retry wrapper gave up; `last` is the final attempt's error.
    #[error("{op} {key:?}: gave up after {attempts} attempts: {last}")]
    RetriesExhausted {
        op: &'static str,
        key: String,
        attempts: u32,
        #[source]
        last: Box<RemoteError>,
    },
}

impl RemoteError {
    /// True if the same request may succeed when sent again.
    pub fn is_retryable(&self) -> bool {
        match self {
            RemoteError::NotFound { .. }
            | RemoteError::Fatal { .. }
            | RemoteError::AlreadyExists { .. }
            | RemoteError::Quota { .. }
            | RemoteError::Auth { .. }
            | RemoteError::RetriesExhausted { .. } => false,
            RemoteError::Transient { .. } => true,
            RemoteError::Io { source, .. } => io_retryable(source),
        }
    }

    /// The wait the server asked for, if any.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            RemoteError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True for [`RemoteError::NotFound`], also under `RetriesExhausted`.
    pub fn is_not_found(&self) -> bool {
        match self {
            RemoteError::NotFound { .. } => true,
            RemoteError::RetriesExhausted { last, .. } => last.is_not_found(),
            _ => false,
        }
    }

    /// The innermost error (under `RetriesExhausted`).
    pub fn root(&self) -> &RemoteError {
        match self {
            RemoteError::RetriesExhausted { last, .. } => last.root(),
            e => e,
        }
    }

    /// True for errors that pause write-back rather than fail it: quota and
    /// credentials problems and refusals (a permission taken away, the
    /// volume's folder renamed or trashed), which a person has to fix.
    pub fn is_pause(&self) -> bool {
        matches!(self.root(), RemoteError::Quota { .. } | RemoteError::Auth { .. } | RemoteError::Fatal { .. })
    }

    /// Converts to an `io::Error` for the `Storage` seam, keeping this error
    /// as the source (never flattened to a string).
    /// A request that gave up after a time-out is `TimedOut`, whether the
    /// attempt's deadline or the caller's budget ran out (other given-up
    /// errors stay `Other`: a `WouldBlock` from a backend must not read as
    /// the tier's "not local").
    pub fn into_io(self) -> io::Error {
        let kind = match (&self, self.root()) {
            (RemoteError::NotFound { .. }, _) => io::ErrorKind::NotFound,
            (RemoteError::Io { source, .. }, _) => source.kind(),
            (RemoteError::RetriesExhausted { .. }, RemoteError::Io { source, .. })
                if source.kind() == io::ErrorKind::TimedOut =>
            {
                io::ErrorKind::TimedOut
            }
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

/// Which I/O error kinds are worth a retry: the ones a network filesystem or
/// a flaky link produces and that say nothing about the request itself.
fn io_retryable(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        TimedOut
            | Interrupted
            | WouldBlock
            | ConnectionReset
            | ConnectionAborted
            | ConnectionRefused
            | BrokenPipe
            | UnexpectedEof
            | NotConnected
    ) || matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ESTALE) | Some(libc::EAGAIN))
}
