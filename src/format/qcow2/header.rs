//! The QCOW2 header (v2 and v3) and its extensions: parsing, validation of
//! every field before it is used for arithmetic or allocation, and the few
//! in-place field updates the engine makes.

use super::{corrupt, unsupported};
use crate::format::DiskResult;
use crate::tier::Storage;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Why an image with an external data file is refused, and the way out.
const DATA_FILE_UNSUPPORTED: &str = "qcow2 images with an external data file (data-file) are not supported: \
    copy the data into one file with `qemu-img convert -O qcow2 IMAGE flat.qcow2`";

/// The way out for an encrypted image (driveblk encrypts volumes itself:
/// `import --encrypt`).
const DECRYPT: &str = "decrypt a copy with `qemu-img convert --object secret,id=s0,file=KEYFILE --image-opts \
    driver=qcow2,file.filename=IMAGE,encrypt.key-secret=s0 -O qcow2 plain.qcow2` and use that (`import --encrypt` \
    encrypts the volume driveblk keeps)";

/// Compatible feature bits.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Byte offsets of header fields the engine rewrites.
pub const OFF_REFCOUNT_TABLE: u64 = 48;
pub const OFF_INCOMPAT: u64 = 72;
pub const OFF_AUTOCLEAR: u64 = 88;

/// Limits QEMU also enforces; they keep a hostile header from making us
/// allocate gigabytes before anything is checked against the file.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Most bytes of snapshot L1 tables a writable open reads in all (each is
/// at most [`MAX_L1_BYTES`]): without it 65536 snapshots, each naming its
/// own 32 MiB table in a sparse file, would have us read 2 TiB into memory.
/// A 2 TiB disk with 64 KiB clusters has 32 KiB L1 tables: 8192 snapshots.
pub const MAX_SNAPSHOT_L1_BYTES: u64 = 256 << 20;
const MAX_BACKING_NAME: u32 = 1023;

/// Highest host offset an L1/L2/refcount entry can express (bits 9..55).
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

/// How compressed clusters are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (no zlib header), 4 KiB window.
    Deflate,
    Zstd,
}

/// A parsed, validated header.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: CompressionType,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Names from the feature name table, for error messages.
    pub feature_names: Vec<(u8, u8, String)>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    pub fn corrupt_bit(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Guest clusters covered by one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }

    fn feature_name(&self, kind: u8, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|(k, b, _)| *k == kind && *b == bit)
            .map(|(_, _, n)| n.clone())
            .unwrap_or_else(|| format!("unknown bit {bit}"))
    }

    /// Reads and validates the header at offset 0 of `storage`.
    pub fn read(storage: &dyn Storage) -> DiskResult<Header> {
        let file_len = storage.len();
        let mut fixed = [0u8; 112];
        storage.read_at(0, &mut fixed).map_err(|e| crate::format::DiskError::io("read qcow2 header", 0, e))?;
        if be32(&fixed, 0) != MAGIC {
            return Err(corrupt(format!("{}: not a qcow2 image (bad magic)", storage.describe())));
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!("qcow2 version {version} (only 2 and 3 exist)")));
        }
        let cluster_bits = be32(&fixed, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!("cluster_bits {cluster_bits} out of range 9..=21")));
        }
        let cluster_size = 1u64 << cluster_bits;
        let backing_file_offset = be64(&fixed, 8);
        let backing_file_size = be32(&fixed, 16);
        let size = be64(&fixed, 24);
        let crypt_method = be32(&fixed, 32);
        if crypt_method != 0 {
            return Err(unsupported(format!(
                "encrypted qcow2 images are not supported (crypt_method {crypt_method}): {DECRYPT}"
            )));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size,
            l1_size: be32(&fixed, 36),
            l1_table_offset: be64(&fixed, 40),
            refcount_table_offset: be64(&fixed, 48),
            refcount_table_clusters: be32(&fixed, 56),
            nb_snapshots: be32(&fixed, 60),
            snapshots_offset: be64(&fixed, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
        };
        if version == 3 {
            h.incompatible = be64(&fixed, 72);
            h.compatible = be64(&fixed, 80);
            h.autoclear = be64(&fixed, 88);
            h.refcount_order = be32(&fixed, 96);
            h.header_length = be32(&fixed, 100);
            if h.header_length < 104 || h.header_length % 8 != 0 {
                return Err(corrupt(format!("v3 header_length {} invalid", h.header_length)));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(corrupt(format!(
                    "header_length {} exceeds the cluster size {cluster_size}",
                    h.header_length
                )));
            }
            if h.refcount_order > 6 {
                return Err(corrupt(format!("refcount_order {} out of range 0..=6", h.refcount_order)));
            }
            if h.header_length > 104 {
                h.compression = match fixed[104] {
                    0 => CompressionType::Deflate,
                    1 => CompressionType::Zstd,
                    t => return Err(unsupported(format!("unknown compression_type {t}"))),
                };
            }
            if h.compression != CompressionType::Deflate && h.incompatible & INCOMPAT_COMPRESSION == 0 {
                return Err(corrupt("compression_type set without the compression incompatible bit".into()));
            }
        }

        // The rest of the first cluster holds extensions and the backing name.
        let mut first = vec![0u8; cluster_size.min(file_len.max(112)) as usize];
        storage.read_at(0, &mut first).map_err(|e| crate::format::DiskError::io("read qcow2 header cluster", 0, e))?;
        h.parse_extensions(&first, backing_file_offset)?;

        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> =
                (0..64).filter(|b| unknown & (1 << b) != 0).map(|b| h.feature_name(0, b as u8)).collect();
            return Err(unsupported(format!("unknown incompatible features: {}", names.join(", "))));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(DATA_FILE_UNSUPPORTED.into()));
        }

        if backing_file_offset != 0 {
            if backing_file_size == 0 || backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt(format!("backing file name length {backing_file_size} invalid")));
            }
            let end = backing_file_offset.checked_add(u64::from(backing_file_size));
            match end {
                Some(end) if end <= first.len() as u64 => {
                    let raw = &first[backing_file_offset as usize..end as usize];
                    let name = String::from_utf8(raw.to_vec())
                        .map_err(|_| corrupt("backing file name is not UTF-8".into()))?;
                    h.backing_file = Some(name);
                }
                _ => {
                    return Err(corrupt(format!(
                        "backing file name at {backing_file_offset}+{backing_file_size} is outside the first cluster"
                    )))
                }
            }
        }

        h.validate_tables(file_len)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, first: &[u8], backing_file_offset: u64) -> DiskResult<()> {
        let mut off = u64::from(self.header_length);
        // Extensions end at the backing file name if there is one.
        let limit = if backing_file_offset != 0 && backing_file_offset < first.len() as u64 {
            backing_file_offset
        } else {
            first.len() as u64
        };
        while off + 8 <= limit {
            let o = off as usize;
            let kind = be32(first, o);
            let len = u64::from(be32(first, o + 4));
            if kind == EXT_END {
                return Ok(());
            }
            let data_start = off + 8;
            let data_end = data_start.checked_add(len).filter(|&e| e <= limit).ok_or_else(|| {
                corrupt(format!("header extension {kind:#x} at {off} length {len} overruns the header"))
            })?;
            let data = &first[data_start as usize..data_end as usize];
            match kind {
                EXT_BACKING_FORMAT => {
                    let s = String::from_utf8(data.to_vec())
                        .map_err(|_| corrupt("backing format extension is not UTF-8".into()))?;
                    self.backing_format = Some(s.trim_end_matches('\0').to_string());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_end = e[2..].iter().position(|&c| c == 0).map_or(46, |p| p);
                        let name = String::from_utf8_lossy(&e[2..2 + name_end]).into_owned();
                        self.feature_names.push((e[0], e[1], name));
                    }
                }
                EXT_CRYPTO => {
                    return Err(unsupported(format!("encrypted qcow2 images (LUKS) are not supported: {DECRYPT}")));
                }
                EXT_DATA_FILE => {
                    return Err(unsupported(DATA_FILE_UNSUPPORTED.into()));
                }
                // Bitmaps and unknown extensions: ignored (bitmaps are
                // invalidated through their autoclear bit when we write).
                _ => {}
            }
            // Extension data is padded to a multiple of 8 bytes.
            off = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn validate_tables(&self, file_len: u64) -> DiskResult<()> {
        let cs = self.cluster_size();
        // L1 must cover the virtual size.
        let per_l1 = cs * self.l2_entries();
        let needed = self.size.div_ceil(per_l1);
        if u64::from(self.l1_size) < needed {
            return Err(corrupt(format!(
                "L1 table too small: {} entries for a {}-byte disk needing {needed}",
                self.l1_size, self.size
            )));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!("L1 table of {} entries is too large", self.l1_size)));
        }
        check_table("L1 table", self.l1_table_offset, l1_bytes, cs, file_len)?;
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if self.refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!("refcount table of {} clusters is invalid", self.refcount_table_clusters)));
        }
        check_table("refcount table", self.refcount_table_offset, rt_bytes, cs, file_len)?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(format!("{} snapshots is more than the limit {MAX_SNAPSHOTS}", self.nb_snapshots)));
        }
        if self.nb_snapshots > 0 {
            // Each entry is at least 40 bytes.
            check_table("snapshot table", self.snapshots_offset, u64::from(self.nb_snapshots) * 40, cs, file_len)?;
        }
        Ok(())
    }
}

/// Why a qcow2 whose file starts with `head` (its first 104 bytes at
/// least) could not be served from a volume, from the fixed header alone:
/// for a file not in hand (`attach` of one already on the remote), before
/// a volume is made of it. `None`: nothing there says no (the rest of the
/// header is checked when the volume is opened).
pub fn refusal_in_head(head: &[u8]) -> Option<String> {
    if head.len() < 104 || be32(head, 0) != MAGIC {
        return Some("it is not a qcow2 image (no qcow2 magic); a raw disk: give --format raw".into());
    }
    let version = be32(head, 4);
    if be32(head, 32) != 0 {
        return Some(format!("it is an encrypted qcow2, which driveblk does not serve: {DECRYPT}"));
    }
    let incompatible = if version >= 3 { be64(head, 72) } else { 0 };
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Some("QEMU marked it corrupt: repair a copy with `qemu-img check -r all IMAGE` and use that".into());
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Some(DATA_FILE_UNSUPPORTED.into());
    }
    if be64(head, 8) != 0 {
        return Some(
            "it is a qcow2 overlay on a backing file, whose data would not be in the volume: flatten it \
             (`qemu-img convert -O qcow2 OVERLAY flat.qcow2` copies the backing file's data in) and use that"
                .into(),
        );
    }
    None
}

/// Checks a metadata table is cluster-aligned and lies within the file.
pub fn check_table(what: &str, offset: u64, bytes: u64, cluster_size: u64, file_len: u64) -> DiskResult<()> {
    if offset % cluster_size != 0 {
        return Err(corrupt(format!("{what} offset {offset:#x} is not cluster-aligned")));
    }
    if offset == 0 && bytes > 0 {
        return Err(corrupt(format!("{what} at offset 0 overlaps the header")));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(corrupt(format!(
            "{what} at {offset:#x} ({bytes} bytes) extends past the end of the file ({file_len} bytes)"
        ))),
    }
}
