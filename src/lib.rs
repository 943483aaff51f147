//! driveblk: a vhost-user-blk daemon that serves raw and QCOW2 images from a
//! tiered store (RAM, local SSD cache, remote volume).
//!
//! Layers, top to bottom (see ARCHITECTURE.md):
//! - [`vhost`]: the vhost-user-blk device: virtqueues, request parsing,
//!   out-of-order completion.
//! - [`format`]: raw / qcow2 translation from guest offsets to image-file offsets.
//! - [`tier`]: where the image file's bytes live (local file; RAM/SSD/remote).
//! - [`volume`]: the remote volume format (import, generations, gc).
//! - [`remote`]: the stores a volume lives on (`dir:`, Drive, object stores).
//!
//! [`cli`] parses the command line into validated configuration and wires
//! the layers together; each layer uses only those below it.

pub mod cli;
pub mod format;
pub mod remote;
pub mod tier;
pub mod vhost;
pub mod volume;
