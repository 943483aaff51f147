//! Volumes on Azure Blob Storage's wire protocol — Azurite, Microsoft's
//! emulator, started by `scripts/azurite.sh`, no mock — through the
//! unchanged CLI and daemon, read by libblkio. Unlike Garage, Azurite keeps
//! `If-None-Match: *`, so writable serving works with no single-writer
//! declaration and the commit fence is the store's own: two hosts
//! alternate on one disk, and a holder that slept through its lease meets
//! the fence when it wakes (refused, nothing overwritten, its change kept
//! for a fork). Only the URL (and the store's variables) differ from `dir:`.

mod common;
#[path = "lease_support/mod.rs"]
mod lease_support;
#[path = "objstore_emu_support/mod.rs"]
mod objstore_emu_support;

#[test]
fn az_two_hosts_alternate_on_one_disk_fenced_by_the_store() {
    let e = objstore_emu_support::azurite();
    assert!(std::env::var_os("DRIVEBLK_OBJSTORE_UNFENCED").is_none());
    let d = tempfile::tempdir().unwrap();
    lease_support::two_hosts_alternate(d.path(), &e.url("vol"), &[]);
}

#[test]
fn az_a_holder_that_slept_through_its_lease_meets_the_fence() {
    let e = objstore_emu_support::azurite();
    let d = tempfile::tempdir().unwrap();
    lease_support::sleeping_holder_is_fenced(d.path(), &e.url("vol"), &[], false);
}
