//! Options shared by every command that talks to a remote: link simulation
//! for tests and benchmarks.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::remote::shaped::{FaultPlan, ShapedRemote, Shaping};
use crate::volume::RemoteOptions;

#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// Simulate a slower link: add this many milliseconds to every remote
    /// request (testing and benchmarks).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub remote_latency_ms: u64,

    /// Simulate a slower link: cap remote transfers at this many Mbit/s in
    /// total (testing and benchmarks). 0 = no cap.
    #[arg(long, value_name = "MBIT", default_value_t = 0)]
    pub remote_bandwidth_mbit: u64,
}

impl RemoteArgs {
    /// The remote options these arguments ask for.
    pub fn options(&self) -> RemoteOptions {
        let mut opts = RemoteOptions::default();
        if self.remote_latency_ms > 0 || self.remote_bandwidth_mbit > 0 {
            let shaping = Shaping {
                latency: Duration::from_millis(self.remote_latency_ms),
                bandwidth_bps: (self.remote_bandwidth_mbit > 0).then(|| self.remote_bandwidth_mbit * 1_000_000),
            };
            opts.layer = Some(Arc::new(move |inner| ShapedRemote::wrap(inner, shaping.clone(), FaultPlan::new(0))));
        }
        opts
    }
}
