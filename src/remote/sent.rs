//! Upload bytes counted as a backend hands them to the network ([`Remote::bytes_sent`](super::Remote::bytes_sent)).
//!
//! A client takes a streamed body piece by piece as its send buffer
//! drains, and the kernel holds what the far end has not acknowledged, up
//! to megabytes (`tcp_unacked`): the pieces taken less those bytes move
//! with the wire. They stop when the far end stops reading, and keep
//! moving, slowly, on a slow uplink. That is what tells a stuck upload
//! from a slow one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;

use super::bwlimit::{pieces, Turn};

/// A shared count of upload bytes sent; clones count into the same total.
#[derive(Clone, Debug, Default)]
pub struct SentBytes(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    /// Bytes the client took.
    taken: AtomicU64,
    /// The highest [`SentBytes::delivered`] answered.
    delivered: AtomicU64,
}

/// A count is not part of what a configuration holding it says: any two
/// compare equal.
impl PartialEq for SentBytes {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl SentBytes {
    pub fn add(&self, n: u64) {
        self.0.taken.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes the client took.
    pub fn get(&self) -> u64 {
        self.0.taken.load(Ordering::Relaxed)
    }

    /// Bytes that crossed the network: those taken, less what the
    /// process's TCP sockets still hold unacknowledged (on a slow uplink
    /// the kernel takes megabytes at once and sends them for minutes);
    /// never less than an earlier answer. Where `/proc` does not say, the
    /// bytes taken.
    pub fn delivered(&self) -> u64 {
        let taken = self.get();
        let now = taken.saturating_sub(super::tcp_unacked::unacked_bytes().unwrap_or(0));
        self.0.delivered.fetch_max(now, Ordering::Relaxed).max(now)
    }

    /// `s` in pieces of at most [`PIECE`](super::bwlimit::PIECE) bytes,
    /// each counted when the client takes it.
    pub fn count<S, E>(&self, s: S) -> BoxStream<'static, Result<Bytes, E>>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Send + 'static,
    {
        let me = self.clone();
        pieces(s, move |n, _| {
            me.add(n);
            std::future::ready(())
        })
    }

    /// `data` as a request body sent in `turn` (paced when it is), counted
    /// as the client takes it. The caller sets `Content-Length`.
    pub fn body(&self, turn: &Turn, data: Bytes) -> reqwest::Body {
        let s = turn.pace(futures::stream::once(async move { Ok::<_, std::io::Error>(data) }));
        reqwest::Body::wrap_stream(self.count(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::bwlimit::PIECE;
    use futures::StreamExt;

    #[tokio::test]
    async fn pieces_are_counted_as_they_are_taken() {
        let sent = SentBytes::default();
        let body = Bytes::from(vec![1u8; 3 * PIECE + 10]);
        let mut s = sent.count(futures::stream::once(async move { Ok::<_, std::io::Error>(body) }));
        assert_eq!(sent.get(), 0, "nothing is counted before the client takes it");
        assert_eq!(s.next().await.unwrap().unwrap().len(), PIECE);
        assert_eq!(sent.get(), PIECE as u64);
        let mut n = PIECE;
        while let Some(p) = s.next().await {
            n += p.unwrap().len();
        }
        assert_eq!((n, sent.get()), (3 * PIECE + 10, (3 * PIECE + 10) as u64));
        // A clone counts into the same total.
        sent.clone().add(5);
        assert_eq!(sent.get(), (3 * PIECE + 15) as u64);
    }
}
