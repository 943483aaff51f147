//! Recognises, by the magic numbers qemu-img probes, image files driveblk
//! cannot serve (VMDK, VDI, VHDX, VHD, QED, Parallels, qcow v1) and images
//! compressed whole (gzip, xz, zstd, bzip2, zip, 7z, tar/OVA), so that they
//! are refused by name with the command that converts them, instead of
//! being stored and served as a raw disk the guest cannot boot. This only
//! refuses: the format served is still the one the user gives.

/// What the first bytes of an image file say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probed {
    /// A qcow2 image (version 2 or 3).
    Qcow2,
    /// Another disk image format, by the name `qemu-img` gives it.
    Foreign { name: &'static str, qemu_fmt: &'static str },
    /// A compressed file or an archive, and the command that unpacks it.
    Packed { name: &'static str, unpack: &'static str },
    /// Nothing recognised: a raw disk as far as anyone can tell.
    Unknown,
}

/// Bytes [`probe`] looks at (the tar magic is at 257).
pub const PROBE_BYTES: usize = 512;

/// Classifies an image by its first bytes (up to [`PROBE_BYTES`]).
pub fn probe(head: &[u8]) -> Probed {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let foreign = |name, qemu_fmt| Probed::Foreign { name, qemu_fmt };
    let packed = |name, unpack| Probed::Packed { name, unpack };
    if at(0, b"QFI\xfb") {
        // The version word follows; qcow (v1) is another format.
        return match head.get(4..8) {
            Some([0, 0, 0, 1]) => foreign("qcow (version 1)", "qcow"),
            _ => Probed::Qcow2,
        };
    }
    if at(0, b"KDMV") || at(0, b"COWD") || at(0, b"# Disk DescriptorFile") {
        return foreign("VMDK (VMware)", "vmdk");
    }
    // VDI: its signature word, little-endian, at 64.
    if at(64, &[0x7f, 0x10, 0xda, 0xbe]) {
        return foreign("VDI (VirtualBox)", "vdi");
    }
    if at(0, b"vhdxfile") {
        return foreign("VHDX (Hyper-V)", "vhdx");
    }
    // A dynamic VHD starts with a copy of its footer; a fixed one is a raw
    // disk with the footer after it, and serves as raw.
    if at(0, b"conectix") {
        return foreign("VHD (Virtual PC, Hyper-V)", "vpc");
    }
    if at(0, b"QED\0") {
        return foreign("QED", "qed");
    }
    if at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt") {
        return foreign("Parallels", "parallels");
    }
    // gzip: its magic, deflate (the only method), no reserved flag bits:
    // two bytes alone would match one raw disk in 65536.
    if at(0, &[0x1f, 0x8b, 0x08]) && head.get(3).is_some_and(|f| f & 0xe0 == 0) {
        return packed("gzip", "gunzip");
    }
    if at(0, &[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return packed("xz", "unxz");
    }
    if at(0, &[0x28, 0xb5, 0x2f, 0xfd]) {
        return packed("zstd", "unzstd");
    }
    if at(0, b"BZh") && at(4, &[0x31, 0x41, 0x59, 0x26, 0x53, 0x59]) {
        return packed("bzip2", "bunzip2");
    }
    if at(0, b"PK\x03\x04") {
        return packed("zip", "unzip");
    }
    if at(0, b"7z\xbc\xaf\x27\x1c") {
        return packed("7z", "7z x");
    }
    if at(257, b"ustar") {
        return packed("tar (an OVA is one)", "tar xf");
    }
    Probed::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(off: usize, magic: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; PROBE_BYTES];
        b[off..off + magic.len()].copy_from_slice(magic);
        b
    }

    #[test]
    fn magic_numbers() {
        assert_eq!(probe(&with(0, b"QFI\xfb\0\0\0\x03")), Probed::Qcow2);
        assert!(matches!(probe(&with(0, b"QFI\xfb\0\0\0\x01")), Probed::Foreign { qemu_fmt: "qcow", .. }));
        assert!(matches!(probe(&with(64, &[0x7f, 0x10, 0xda, 0xbe])), Probed::Foreign { qemu_fmt: "vdi", .. }));
        assert!(matches!(probe(&with(257, b"ustar")), Probed::Packed { unpack: "tar xf", .. }));
        assert!(matches!(probe(&with(0, &[0x1f, 0x8b, 8, 0])), Probed::Packed { unpack: "gunzip", .. }));
        assert_eq!(probe(&with(0, &[0x1f, 0x8b, 8, 0x80])), Probed::Unknown);
        // A boot sector, a short file, an empty one.
        assert_eq!(probe(&with(510, &[0x55, 0xaa])), Probed::Unknown);
        assert_eq!(probe(b"KDM"), Probed::Unknown);
        assert_eq!(probe(b""), Probed::Unknown);
    }
}
