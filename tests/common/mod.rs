//! Shared test helpers: start the driveblk binary, and a synchronous
//! libblkio (virtio-blk-vhost-user) client to drive it.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// The driveblk binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_driveblk")
}

/// Runs `driveblk ARGS`, asserts it succeeded, returns its stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(out.status.success(), "driveblk {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A driveblk daemon child process, stopped with SIGTERM on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `driveblk serve --socket SOCK <args>` and waits for the socket.
    pub fn start(socket: &Path, args: &[&str]) -> Daemon {
        Self::start_env(socket, args, &[])
    }

    /// [`start`](Self::start) with extra environment variables (another
    /// "host": `DRIVEBLK_HOSTNAME`, a skewed clock, ...).
    pub fn start_env(socket: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::start_logged(socket, args, env, None)
    }

    /// [`start_env`](Self::start_env), its stderr (the log) going to `log`
    /// when given.
    pub fn start_logged(socket: &Path, args: &[&str], env: &[(&str, &str)], log: Option<&Path>) -> Daemon {
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::File::create(p).expect("create the daemon's log")),
            None => Stdio::inherit(),
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_driveblk"));
        // The host-wide limits (`--bwlimit` clocks) of the test's own
        // directory: tests running at once are not one host's processes.
        if !env.iter().any(|(k, _)| *k == "DRIVEBLK_LINK" || *k == "DRIVEBLK_CACHE") {
            cmd.env("DRIVEBLK_LINK", socket.parent().unwrap_or(Path::new("/tmp")).join("link"));
        }
        let child = cmd
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn driveblk");
        let mut d = Daemon { child: Some(child), socket: socket.to_path_buf() };
        d.wait_for_socket(log);
        d
    }

    /// Waits for the socket; a daemon that exits first fails the test with
    /// the end of its log, when it has one (a temp dir's log is gone by
    /// the time anyone could read it).
    fn wait_for_socket(&mut self, log: Option<&Path>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let text = log.and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                panic!("driveblk exited early: {st}\n{}", lines[lines.len().saturating_sub(30)..].join("\n"));
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                // That probe connection is served and closed like any client.
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("driveblk socket {} did not appear", self.socket.display());
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_timeout(&mut child, Duration::from_secs(30))
    }
}

/// Runs `driveblk serve --socket SOCKET ARGS`, which must fail (within a
/// minute); returns its stderr.
pub fn serve_fails(socket: &Path, args: &[&str]) -> String {
    let mut child = Command::new(bin())
        .args(["serve", "--socket", socket.to_str().unwrap()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let st = wait_timeout(&mut child, Duration::from_secs(60));
    assert!(!st.success(), "serve {args:?} succeeded");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    err
}

pub fn wait_timeout(child: &mut Child, t: Duration) -> ExitStatus {
    let deadline = Instant::now() + t;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("driveblk did not exit within {t:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A libblkio connection with one queue per worker and a shared buffer.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub capacity: u64,
}

pub const BUF_LEN: usize = 8 << 20;

impl Client {
    pub fn connect(socket: &Path, num_queues: i32) -> Client {
        Self::connect_with(socket, num_queues, false)
    }

    /// Connects; a read-only device requires the client to ask for read-only.
    pub fn connect_with(socket: &Path, num_queues: i32, read_only: bool) -> Client {
        Self::connect_sized(socket, num_queues, read_only, None)
    }

    /// [`connect_with`](Self::connect_with), with libblkio's virtqueue
    /// size set (its default: 256).
    pub fn connect_sized(socket: &Path, num_queues: i32, read_only: bool, queue_size: Option<i32>) -> Client {
        let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio new");
        b.set_str("path", socket.to_str().unwrap()).unwrap();
        b.set_bool("read-only", read_only).unwrap();
        b.connect().expect("blkio connect");
        b.set_i32("num-queues", num_queues).unwrap();
        if let Some(n) = queue_size {
            b.set_i32("queue-size", n).unwrap();
        }
        let out = b.start().expect("blkio start");
        let capacity = b.get_u64("capacity").unwrap();
        let region = b.alloc_mem_region(BUF_LEN).unwrap();
        b.map_mem_region(&region).unwrap();
        Client { blkio: b, queues: out.queues, region, capacity }
    }

    // The region is memory libblkio shares with the device, not part of
    // `self`; handing out a mutable view from `&self` mirrors that.
    #[allow(clippy::mut_from_ref)]
    pub fn buf(&self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Waits for `n` completions on queue `q`; returns them.
    pub fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::new();
        let mut comps: Vec<MaybeUninit<Completion>> = (0..n.max(1)).map(|_| MaybeUninit::uninit()).collect();
        while out.len() < n {
            let mut t = Duration::from_secs(30);
            let got = self.queues[q].do_io(&mut comps[..n - out.len()], 1, Some(&mut t), None).expect("do_io");
            assert!(got > 0, "timed out waiting for completions");
            for c in &comps[..got] {
                let c = unsafe { c.assume_init_read() };
                out.push((c.user_data, c.ret));
            }
        }
        out
    }

    fn one(&mut self, q: usize) -> i32 {
        self.wait(q, 1)[0].1
    }

    pub fn read(&mut self, off: u64, len: usize) -> Result<Vec<u8>, i32> {
        assert!(len <= BUF_LEN);
        let p = self.region.addr as *mut u8;
        self.queues[0].read(off, p, len, 0, ReqFlags::empty());
        match self.one(0) {
            0 => Ok(self.buf()[..len].to_vec()),
            e => Err(e),
        }
    }

    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<(), i32> {
        assert!(data.len() <= BUF_LEN);
        self.buf()[..data.len()].copy_from_slice(data);
        let p = self.region.addr as *const u8;
        self.queues[0].write(off, p, data.len(), 0, ReqFlags::empty());
        match self.one(0) {
            0 => Ok(()),
            e => Err(e),
        }
    }

    pub fn flush(&mut self) -> Result<(), i32> {
        self.queues[0].flush(0, ReqFlags::empty());
        match self.one(0) {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// One completion on queue 0 within `t`: its status, or None when none
    /// came or the connection failed (the daemon let the guest go).
    fn one_within(&mut self, t: Duration) -> Option<i32> {
        let mut comps = [MaybeUninit::<Completion>::uninit()];
        let mut t = t;
        match self.queues[0].do_io(&mut comps, 1, Some(&mut t), None) {
            Ok(1) => Some(unsafe { comps[0].assume_init_read() }.ret),
            _ => None,
        }
    }

    /// A write answered within `t` (Some(status)), or None.
    pub fn write_within(&mut self, off: u64, data: &[u8], t: Duration) -> Option<i32> {
        assert!(data.len() <= BUF_LEN);
        self.buf()[..data.len()].copy_from_slice(data);
        let p = self.region.addr as *const u8;
        self.queues[0].write(off, p, data.len(), 0, ReqFlags::empty());
        self.one_within(t)
    }

    /// A FLUSH answered within `t` (Some(status)), or None.
    pub fn flush_within(&mut self, t: Duration) -> Option<i32> {
        self.queues[0].flush(0, ReqFlags::empty());
        self.one_within(t)
    }

    pub fn discard(&mut self, off: u64, len: u64) -> Result<(), i32> {
        self.queues[0].discard(off, len, 0, ReqFlags::empty());
        match self.one(0) {
            0 => Ok(()),
            e => Err(e),
        }
    }

    pub fn write_zeroes(&mut self, off: u64, len: u64, unmap: bool) -> Result<(), i32> {
        let flags = if unmap { ReqFlags::empty() } else { ReqFlags::NO_UNMAP };
        self.queues[0].write_zeroes(off, len, 0, flags);
        match self.one(0) {
            0 => Ok(()),
            e => Err(e),
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Creates a raw image file of `len` bytes filled with `pattern(seed)`.
pub fn make_raw(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = pattern(seed, len);
    std::fs::write(path, &data).unwrap();
    data
}
