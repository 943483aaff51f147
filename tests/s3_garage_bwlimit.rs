//! `--bwlimit` on a real S3 store (a one-node Garage started by
//! `scripts/garage.sh`), seen from the wire: a proxy in front of the store
//! logs when the bytes of an upload arrive. object_store hands its client
//! whole parts; under a limit they go out through driveblk's paced client
//! at about the limit in every quarter second, not in line-speed bursts.

#[path = "garage_support/mod.rs"]
mod garage_support;
mod net_support;

use driveblk::remote::{BwLimit, BwSchedule, PutBody, RemoteUrl};

/// An 8 MiB object (a multipart upload of a 5 MiB and a 3 MiB part, both
/// in flight at once) at 1 MiB/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_bwlimit_paces_parts_on_the_wire() {
    let g = garage_support::garage();
    let endpoint = std::env::var("AWS_ENDPOINT").unwrap();
    let proxy = net_support::MeterProxy::start(endpoint.trim_start_matches("http://")).await;
    std::env::set_var("AWS_ENDPOINT", proxy.url());
    let mut cfg = g.config(false);
    let rate = 1 << 20;
    cfg.set_bwlimit(BwLimit::new(BwSchedule::fixed(Some(rate), None)));
    let r = RemoteUrl::parse(&g.url("vol")).unwrap().folder_with(&cfg);
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    proxy.reset();
    r.put("pack-1", PutBody::from_bytes(data.clone())).await.unwrap();
    net_support::assert_paced(&proxy.up, 1, 8 << 20, rate);
    assert_eq!(&r.get_range("pack-1", 0..1000).await.unwrap()[..], &data[..1000]);
}
