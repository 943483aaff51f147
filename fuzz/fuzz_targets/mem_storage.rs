//! An image file in memory for fuzz targets: reads past the end see
//! zeroes, writes may grow it up to a cap so a hostile input cannot make
//! the fuzzer allocate without bound.

use driveblk::format::{IoMode, IoVec};
use driveblk::tier::Storage;
use parking_lot::Mutex;

pub struct Mem(pub Mutex<Vec<u8>>);

const MAX_FILE: usize = 64 << 20;

impl Mem {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Mutex::new(bytes))
    }
}

impl Storage for Mem {
    fn len(&self) -> u64 {
        self.0.lock().len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, _mode: IoMode) -> std::io::Result<()> {
        let d = self.0.lock();
        let n = bufs.len();
        let start = (offset.min(d.len() as u64)) as usize;
        let end = (start + n).min(d.len());
        bufs.copy_from_slice(0, &d[start..end]);
        bufs.fill_zero(end - start, n - (end - start));
        Ok(())
    }
    fn write_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, _mode: IoMode) -> std::io::Result<()> {
        let mut d = self.0.lock();
        let end = offset.checked_add(bufs.len() as u64).filter(|&e| e <= MAX_FILE as u64);
        let Some(end) = end else { return Err(std::io::Error::other("file too large")) };
        if d.len() < end as usize {
            d.resize(end as usize, 0);
        }
        bufs.copy_to_slice(0, &mut d[offset as usize..end as usize]);
        Ok(())
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut z = vec![0u8; len.min(MAX_FILE as u64) as usize];
        let v = IoVec::from_slice(&mut z);
        self.write_vectored_at(offset, &v, IoMode::Blocking)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len > MAX_FILE as u64 {
            return Err(std::io::Error::other("file too large"));
        }
        self.0.lock().resize(len as usize, 0);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "fuzz input".into()
    }
}
