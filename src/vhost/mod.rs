//! vhost layer: the vhost-user-blk device. Parses virtio-blk requests from
//! guest memory, runs them against a [`Disk`](crate::format::Disk), completes
//! them out of order (tracked in flight so a crashed daemon's successor
//! resubmits the unfinished ones), and manages the socket and frontend
//! connections.

pub mod backend;
pub mod config;
pub mod daemon;
pub mod helper;
pub mod inflight;
pub mod pool;
pub mod ratelimit;
pub mod request;

pub use backend::BlockBackend;
pub use config::DeviceConfig;
pub use daemon::{rename_noreplace, socket_free, ServeError, Server, StopHandle};
