//! `driveblk serve`: arguments and their validation.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use crate::format::ImageFormat;
use crate::vhost::config::ID_BYTES;
use crate::vhost::DeviceConfig;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Path of the vhost-user unix socket to listen on (QEMU connects to it
    /// with `-chardev socket,path=...`).
    #[arg(long)]
    pub socket: PathBuf,

    /// Image file to serve.
    #[arg(long)]
    pub image: PathBuf,

    /// Image format: raw or qcow2. Never guessed from the contents.
    #[arg(long)]
    pub format: ImageFormat,

    /// Export the disk read-only (the guest sees a read-only device).
    #[arg(long)]
    pub read_only: bool,

    /// Number of virtqueues (one worker thread each).
    #[arg(long, default_value_t = 1)]
    pub num_queues: u16,

    /// Maximum virtqueue size the frontend may configure (power of two).
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,

    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    #[arg(long, default_value = "driveblk")]
    pub serial: String,

    /// Threads for requests that must wait (cache misses, allocation, flush).
    #[arg(long, default_value_t = 16)]
    pub io_threads: usize,
}

/// Validated settings for `serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub socket: PathBuf,
    pub image: PathBuf,
    pub format: ImageFormat,
    pub device: DeviceConfig,
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = anyhow::Error;

    fn try_from(a: ServeArgs) -> anyhow::Result<Self> {
        if a.num_queues == 0 || a.num_queues > 64 {
            bail!("--num-queues must be between 1 and 64 (got {})", a.num_queues);
        }
        if !a.queue_size.is_power_of_two() || !(2..=32768).contains(&a.queue_size) {
            bail!("--queue-size must be a power of two between 2 and 32768 (got {})", a.queue_size);
        }
        if a.serial.len() > ID_BYTES {
            bail!("--serial is {} bytes; at most {ID_BYTES} fit in a virtio-blk id", a.serial.len());
        }
        if a.io_threads == 0 || a.io_threads > 1024 {
            bail!("--io-threads must be between 1 and 1024 (got {})", a.io_threads);
        }
        let image = a.image.canonicalize().with_context(|| format!("image {}", a.image.display()))?;
        Ok(ServeConfig {
            socket: a.socket,
            image,
            format: a.format,
            device: DeviceConfig {
                num_queues: a.num_queues,
                queue_size: a.queue_size,
                read_only: a.read_only,
                serial: a.serial.into_bytes(),
                io_threads: a.io_threads,
            },
        })
    }
}
