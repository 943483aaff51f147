//! The internal snapshot table: parsing the variable-length entries with
//! every length checked against the bytes actually read.

use super::corrupt;
use crate::format::{DiskError, DiskResult};
use crate::tier::Storage;

/// Largest snapshot table we read (QEMU's limit too).
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Extra data QEMU writes is 16 or 24 bytes; more is legal but capped here.
const MAX_EXTRA: u32 = 1024;

/// One internal snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    /// Virtual disk size at snapshot time, when recorded (v3 extra data).
    pub disk_size: Option<u64>,
    pub vm_state_size: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
}

/// Reads `count` entries at `offset`. Returns the entries and the table's
/// length in bytes.
pub fn read_table(storage: &dyn Storage, offset: u64, count: u32) -> DiskResult<(Vec<Snapshot>, u64)> {
    if count == 0 {
        return Ok((Vec::new(), 0));
    }
    let file_len = storage.len();
    let avail = file_len.saturating_sub(offset).min(MAX_TABLE_BYTES);
    // Read in growing chunks: the table's length is only known by parsing it.
    let mut buf = Vec::new();
    let mut pos = 0usize;
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let need = |buf: &mut Vec<u8>, upto: usize| -> DiskResult<()> {
        if upto as u64 > avail {
            return Err(corrupt(format!(
                "snapshot table at {offset:#x} extends past the end of the file or the {MAX_TABLE_BYTES}-byte limit"
            )));
        }
        if upto > buf.len() {
            let new_len = (upto.max(buf.len() * 2).max(4096) as u64).min(avail) as usize;
            let old = buf.len();
            buf.resize(new_len, 0);
            storage
                .read_at(offset + old as u64, &mut buf[old..])
                .map_err(|e| DiskError::io("read snapshot table", offset + old as u64, e))?;
        }
        Ok(())
    };
    for n in 0..count {
        let at = offset + pos as u64;
        need(&mut buf, pos + 40)?;
        let h = &buf[pos..pos + 40];
        let l1_table_offset = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
        let l1_size = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
        let id_len = usize::from(u16::from_be_bytes([h[12], h[13]]));
        let name_len = usize::from(u16::from_be_bytes([h[14], h[15]]));
        let date_sec = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
        let date_nsec = u32::from_be_bytes(h[20..24].try_into().unwrap_or_default());
        let vm_clock_nsec = u64::from_be_bytes(h[24..32].try_into().unwrap_or_default());
        let vm_state_size32 = u32::from_be_bytes(h[32..36].try_into().unwrap_or_default());
        let extra = u32::from_be_bytes(h[36..40].try_into().unwrap_or_default());
        if extra > MAX_EXTRA {
            return Err(corrupt(format!("snapshot {n} at {at:#x}: extra data size {extra} too large")));
        }
        let extra = extra as usize;
        let total = 40 + extra + id_len + name_len;
        need(&mut buf, pos + total)?;
        let e = &buf[pos + 40..pos + 40 + extra];
        let vm_state_size = if extra >= 8 {
            u64::from_be_bytes(e[0..8].try_into().unwrap_or_default())
        } else {
            u64::from(vm_state_size32)
        };
        let disk_size =
            if extra >= 16 { Some(u64::from_be_bytes(e[8..16].try_into().unwrap_or_default())) } else { None };
        let s = pos + 40 + extra;
        let id = String::from_utf8_lossy(&buf[s..s + id_len]).into_owned();
        let name = String::from_utf8_lossy(&buf[s + id_len..s + id_len + name_len]).into_owned();
        out.push(Snapshot {
            id,
            name,
            l1_table_offset,
            l1_size,
            disk_size,
            vm_state_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
        });
        // Entries are padded to a multiple of 8 bytes.
        pos += total.div_ceil(8) * 8;
    }
    Ok((out, pos as u64))
}
