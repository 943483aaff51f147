//! Bytes this process has written to its TCP client connections that the
//! far end has not yet acknowledged (the kernel's `tx_queue` in
//! `/proc/net/tcp`): what a count of bytes handed to a client cannot see,
//! up to the 4 MiB a socket's send buffer holds, minutes of a slow uplink.

use std::collections::HashSet;

/// The sum over this process's TCP client connections of their bytes
/// written and not acknowledged; None where `/proc` does not say (another
/// OS, a sandbox without it). Connections this process accepted (its
/// metrics endpoint's answers, held until the peer's delayed ACK) are not
/// uploads and are left out.
pub fn unacked_bytes() -> Option<u64> {
    let sockets = own_sockets()?;
    let tables: Vec<String> =
        ["/proc/self/net/tcp", "/proc/self/net/tcp6"].iter().filter_map(|t| std::fs::read_to_string(t).ok()).collect();
    if tables.is_empty() {
        return None;
    }
    let lines = || tables.iter().flat_map(|t| t.lines().skip(1));
    let served: HashSet<u16> = lines().filter_map(|l| listening_port(l, &sockets)).collect();
    Some(lines().filter_map(|l| unacked_in(l, &sockets, &served)).sum())
}

/// The inodes of this process's sockets.
fn own_sockets() -> Option<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for e in std::fs::read_dir("/proc/self/fd").ok().into_iter().flatten().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        let ino = target.to_str().and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok());
        inodes.extend(ino);
    }
    Some(inodes)
}

/// A line's columns: state, queues, inode and local port.
fn columns(line: &str) -> Option<(&str, &str, u64, u16)> {
    let cols: Vec<&str> = line.split_whitespace().collect();
    let port = u16::from_str_radix(cols.get(1)?.rsplit(':').next()?, 16).ok()?;
    Some((cols.get(3)?, cols.get(4)?, cols.get(9)?.parse::<u64>().ok()?, port))
}

/// The local port of a line's socket if it is one of `own` and listening.
fn listening_port(line: &str, own: &HashSet<u64>) -> Option<u16> {
    let (state, _, inode, port) = columns(line)?;
    (state == "0A" && own.contains(&inode)).then_some(port)
}

/// A line of a `/proc/net/tcp` table: its `tx_queue` (write_seq - snd_una)
/// if the socket is one of `own`, not listening (where the column counts
/// connections waiting to be accepted) and not accepted on one of the
/// `served` ports.
fn unacked_in(line: &str, own: &HashSet<u64>, served: &HashSet<u16>) -> Option<u64> {
    let (state, queues, inode, port) = columns(line)?;
    if state == "0A" || !own.contains(&inode) || served.contains(&port) {
        return None;
    }
    u64::from_str_radix(queues.split(':').next()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    #[test]
    fn bytes_a_peer_has_not_read_are_seen_until_it_reads_them() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut rx, _) = listener.accept().unwrap();
        let before = unacked_bytes().expect("/proc/self/net/tcp");
        // The peer reads nothing: once its receive window is full, what is
        // written stays in this side's send queue.
        tx.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 << 10];
        let mut written = 0usize;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            match tx.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        let stuck = unacked_bytes().unwrap();
        assert!(stuck >= before + (16 << 10), "{written} bytes written, {stuck} unacknowledged (before: {before})");
        // The peer reads it all: acknowledged, the queue empties.
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < written {
            got += rx.read(&mut buf).unwrap();
        }
        let t0 = Instant::now();
        while unacked_bytes().unwrap() > before && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(unacked_bytes().unwrap() <= before, "still {} unacknowledged", unacked_bytes().unwrap());
    }

    #[test]
    fn lines_of_other_processes_listeners_and_accepted_connections_are_left_out() {
        let own: HashSet<u64> = [340, 341, 343].into();
        let listen =
            "0: 00000000:07E8 00000000:0000 0A 00000005:00000000 00:00000000 00000000 0 0 340 1 0 100 0 0 10 0";
        let mine = "1: 0100007F:A000 0100007F:07E8 01 00001000:00000000 00:00000000 00000000 0 0 341 1 0 100 0 0 10 0";
        let other = "2: 0100007F:A001 0100007F:07E8 01 00002000:00000000 00:00000000 00000000 0 0 342 1 0 100 0 0 10 0";
        // An answer this process's server sent, not yet acknowledged.
        let accepted =
            "3: 0100007F:07E8 0100007F:A002 01 00000228:00000000 00:00000000 00000000 0 0 343 1 0 100 0 0 10 0";
        let served: HashSet<u16> =
            [listen, mine, other, accepted].iter().filter_map(|l| listening_port(l, &own)).collect();
        assert_eq!(served, [0x07E8].into());
        assert_eq!(unacked_in(listen, &own, &served), None);
        assert_eq!(unacked_in(mine, &own, &served), Some(0x1000));
        assert_eq!(unacked_in(other, &own, &served), None);
        assert_eq!(unacked_in(accepted, &own, &served), None);
        assert_eq!(unacked_in("garbage", &own, &served), None);
    }
}
