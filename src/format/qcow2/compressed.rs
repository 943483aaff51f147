//! Compressed clusters: inflating raw deflate (QEMU's default) or zstd into a
//! full cluster. Compressed data is followed by slack up to the next 512-byte
//! boundary, so decoders must stop at the end of the stream, not the input.

use std::io::Read;

use super::corrupt;
use super::header::CompressionType;
use crate::format::DiskResult;

/// Decompresses `input` into exactly `out.len()` bytes (one cluster).
/// `host` is only for error messages.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8], host: u64) -> DiskResult<()> {
    match kind {
        CompressionType::Deflate => inflate(input, out, host),
        CompressionType::Zstd => unzstd(input, out, host),
    }
}

fn inflate(input: &[u8], out: &mut [u8], host: u64) -> DiskResult<()> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;
    let mut d = DecompressorOxide::new();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _read, written) = decompress(&mut d, input, out, 0, flags);
    // Like QEMU, a stream that fills the cluster is accepted even if it does
    // not end exactly there.
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(()),
        _ => Err(corrupt(format!(
            "compressed cluster at {host:#x}: deflate stream invalid ({status:?}, {written} of {} bytes)",
            out.len()
        ))),
    }
}

fn unzstd(input: &[u8], out: &mut [u8], host: u64) -> DiskResult<()> {
    let err = |what: String| corrupt(format!("compressed cluster at {host:#x}: zstd {what}"));
    // One frame only: the slack after it is not another frame.
    let mut dec =
        zstd::stream::read::Decoder::with_buffer(input).map_err(|e| err(format!("frame header: {e}")))?.single_frame();
    let mut done = 0;
    while done < out.len() {
        match dec.read(&mut out[done..]) {
            Ok(0) => return Err(err(format!("stream ended after {done} of {} bytes", out.len()))),
            Ok(n) => done += n,
            Err(e) => return Err(err(format!("decode error: {e}"))),
        }
    }
    Ok(())
}
