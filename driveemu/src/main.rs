//! The `driveemu` binary: runs the emulator on a chosen address for scripts and benchmarks.
fn main() {}
