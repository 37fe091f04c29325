//! The one place in DWCP with `unsafe` code: socket options that no safe crate binds, and a
//! file mapped as memory ([`FileMemory`], see its module).
//!
//! Today that is `TCP_INFO`, what the Linux kernel counts on one TCP connection: its
//! retransmissions, bytes sent and acknowledged, round trip and window. socket2 and rustix
//! bind many options but not this one. Everything here is read-only; the `unsafe` is one
//! `getsockopt` into a byte buffer, and the fields are then read from the bytes by their
//! offsets in the kernel's `struct tcp_info` (`include/uapi/linux/tcp.h`), so no Rust struct
//! layout is trusted.
//!
//! ```text
//!  socket (any AsFd) --dup--> TcpProbe --getsockopt(TCP_INFO)--> [u8; 320] --parse--> TcpInfo
//! ```
//!
//! Fields the running kernel does not fill (older kernels return a shorter struct) are `None`.
//! On other systems [`tcp_info`] returns an [`std::io::ErrorKind::Unsupported`] error.

mod filemem;
pub use filemem::FileMemory;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

/// What the kernel counted on one TCP connection (`TCP_INFO`). Counters are over the whole
/// life of the connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpInfo {
    /// The connection's state (`TCP_ESTABLISHED` is 1).
    pub state: u8,
    /// Segments retransmitted over the connection's life (`tcpi_total_retrans`).
    pub total_retrans: u32,
    /// Segments in flight marked lost now, retransmitted or not (`tcpi_lost`).
    pub lost: u32,
    /// Smoothed round trip (`tcpi_rtt`).
    pub rtt: Duration,
    /// Its variation (`tcpi_rttvar`).
    pub rtt_var: Duration,
    /// Congestion window, in segments.
    pub snd_cwnd: u32,
    /// Sender's maximum segment size.
    pub snd_mss: u32,
    /// Bytes the peer acknowledged (Linux 4.1).
    pub bytes_acked: Option<u64>,
    /// Bytes received (Linux 4.1).
    pub bytes_received: Option<u64>,
    /// Data segments sent, retransmissions included (Linux 4.6).
    pub data_segs_out: Option<u32>,
    /// Bytes sent, retransmissions included (Linux 4.19).
    pub bytes_sent: Option<u64>,
    /// Bytes retransmitted (Linux 4.19).
    pub bytes_retrans: Option<u64>,
    /// The kernel's latest delivery-rate sample, bytes per second (Linux 4.9).
    pub delivery_rate: Option<u64>,
    /// Time with data outstanding, the limited times below included (`tcpi_busy_time`,
    /// Linux 4.10; counted in jiffies). The rest of the connection's life it waited for the
    /// application.
    pub busy_time: Option<Duration>,
    /// Of it, time the peer's receive window held the sender back (`tcpi_rwnd_limited`).
    pub rwnd_limited: Option<Duration>,
    /// Of it, time the socket's send buffer held the sender back (`tcpi_sndbuf_limited`).
    pub sndbuf_limited: Option<Duration>,
}

// Offsets in `struct tcp_info` (include/uapi/linux/tcp.h); the test below checks them against
// libc's copy of the struct.
const STATE: usize = 0;
const SND_MSS: usize = 16;
const LOST: usize = 32;
const RTT: usize = 68;
const RTTVAR: usize = 72;
const SND_CWND: usize = 80;
const TOTAL_RETRANS: usize = 100;
const BYTES_ACKED: usize = 120;
const BYTES_RECEIVED: usize = 128;
const DATA_SEGS_OUT: usize = 156;
const DELIVERY_RATE: usize = 160;
const BUSY_TIME: usize = 168;
const RWND_LIMITED: usize = 176;
const SNDBUF_LIMITED: usize = 184;
const BYTES_SENT: usize = 200;
const BYTES_RETRANS: usize = 208;
/// The first fields up to `tcpi_total_retrans`, which every kernel since 2.6 fills.
const BASE_LEN: usize = TOTAL_RETRANS + 4;
/// Room for the whole struct of today's kernels (about 250 bytes) and some growth.
const BUF_LEN: usize = 320;

impl TcpInfo {
    /// Reads the fields from the bytes the kernel wrote (`len` of them valid); `None` when
    /// fewer than the base fields came back.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        if buf.len() < BASE_LEN {
            return None;
        }
        let u32_at = |at: usize| -> Option<u32> {
            let b = buf.get(at..at + 4)?;
            Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        let u64_at = |at: usize| -> Option<u64> {
            let b = buf.get(at..at + 8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            Some(u64::from_ne_bytes(a))
        };
        let micros =
            |at: usize| u32_at(at).map_or(Duration::ZERO, |u| Duration::from_micros(u64::from(u)));
        let micros64 = |at: usize| u64_at(at).map(Duration::from_micros);
        Some(Self {
            state: buf[STATE],
            total_retrans: u32_at(TOTAL_RETRANS)?,
            lost: u32_at(LOST)?,
            rtt: micros(RTT),
            rtt_var: micros(RTTVAR),
            snd_cwnd: u32_at(SND_CWND)?,
            snd_mss: u32_at(SND_MSS)?,
            bytes_acked: u64_at(BYTES_ACKED),
            bytes_received: u64_at(BYTES_RECEIVED),
            data_segs_out: u32_at(DATA_SEGS_OUT),
            bytes_sent: u64_at(BYTES_SENT),
            bytes_retrans: u64_at(BYTES_RETRANS),
            delivery_rate: u64_at(DELIVERY_RATE),
            busy_time: micros64(BUSY_TIME),
            rwnd_limited: micros64(RWND_LIMITED),
            sndbuf_limited: micros64(SNDBUF_LIMITED),
        })
    }
}

/// Reads `TCP_INFO` of the TCP socket `sock`.
#[cfg(target_os = "linux")]
pub fn tcp_info(sock: &impl AsFd) -> io::Result<TcpInfo> {
    use std::os::fd::AsRawFd;
    let fd = sock.as_fd();
    let mut buf = [0u8; BUF_LEN];
    let mut len = BUF_LEN as libc::socklen_t;
    // SAFETY: `buf` is valid for writes of `len` bytes for the whole call and nothing else
    // refers to it; the kernel writes at most `len` bytes there and stores in `len` how many
    // it wrote. `fd` is borrowed from a live socket for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = (len as usize).min(BUF_LEN);
    TcpInfo::parse(&buf[..len]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TCP_INFO returned {len} bytes, fewer than the {BASE_LEN} every kernel fills"),
        )
    })
}

/// Reads `TCP_INFO` of the TCP socket `sock` (Linux only).
#[cfg(not(target_os = "linux"))]
pub fn tcp_info(sock: &impl AsFd) -> io::Result<TcpInfo> {
    let _ = sock;
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "TCP_INFO is read on Linux only",
    ))
}

/// A second descriptor of a TCP socket, to read its `TCP_INFO` from elsewhere than the task
/// that owns the socket (a session's bookkeeping, while its writer tasks hold the streams).
///
/// It keeps the socket open while it lives: drop it with the connection it watches. An
/// explicit `shutdown` still sends the FIN at once; closing the connection's own descriptor
/// without one leaves the socket open until the probe is dropped too.
#[derive(Debug)]
pub struct TcpProbe(OwnedFd);

impl TcpProbe {
    /// Watches the socket behind `sock` (duplicates its descriptor).
    pub fn new(sock: &impl AsFd) -> io::Result<Self> {
        sock.as_fd().try_clone_to_owned().map(Self)
    }

    /// What the kernel counted on the socket so far.
    pub fn info(&self) -> io::Result<TcpInfo> {
        tcp_info(&self.0)
    }
}

/// Has the child that `cmd` starts killed (SIGKILL) when the thread that starts it ends,
/// as happens to every thread when this process is killed outright: a helper started for a
/// test bed or a benchmark does not outlive it. Start it from a thread that lives as long as
/// the process (the main thread). Linux only; elsewhere nothing is set.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs between fork and exec and makes one async-signal-safe
        // system call (prctl), touching no memory of the parent's.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                // PR_SET_PDEATHSIG with a signal number; no pointers.
                let r = libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                if r == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn offsets_are_the_kernels() {
        use std::mem::offset_of;
        type T = libc::tcp_info;
        assert_eq!(offset_of!(T, tcpi_state), STATE);
        assert_eq!(offset_of!(T, tcpi_snd_mss), SND_MSS);
        assert_eq!(offset_of!(T, tcpi_lost), LOST);
        assert_eq!(offset_of!(T, tcpi_rtt), RTT);
        assert_eq!(offset_of!(T, tcpi_rttvar), RTTVAR);
        assert_eq!(offset_of!(T, tcpi_snd_cwnd), SND_CWND);
        assert_eq!(offset_of!(T, tcpi_total_retrans), TOTAL_RETRANS);
        assert_eq!(offset_of!(T, tcpi_bytes_acked), BYTES_ACKED);
        assert_eq!(offset_of!(T, tcpi_bytes_received), BYTES_RECEIVED);
        assert_eq!(offset_of!(T, tcpi_data_segs_out), DATA_SEGS_OUT);
        assert_eq!(offset_of!(T, tcpi_delivery_rate), DELIVERY_RATE);
        assert_eq!(offset_of!(T, tcpi_bytes_sent), BYTES_SENT);
        assert_eq!(offset_of!(T, tcpi_bytes_retrans), BYTES_RETRANS);
        assert_eq!(offset_of!(T, tcpi_busy_time), BUSY_TIME);
        assert_eq!(offset_of!(T, tcpi_rwnd_limited), RWND_LIMITED);
        assert_eq!(offset_of!(T, tcpi_sndbuf_limited), SNDBUF_LIMITED);
        assert!(size_of::<T>() <= BUF_LEN);
    }

    #[test]
    fn short_answers_leave_the_newer_fields_out() {
        assert_eq!(TcpInfo::parse(&[0; BASE_LEN - 1]), None);
        let mut old = [0u8; BASE_LEN];
        old[TOTAL_RETRANS..TOTAL_RETRANS + 4].copy_from_slice(&7u32.to_ne_bytes());
        old[RTT..RTT + 4].copy_from_slice(&1500u32.to_ne_bytes());
        let i = TcpInfo::parse(&old).unwrap();
        assert_eq!(i.total_retrans, 7);
        assert_eq!(i.rtt, Duration::from_micros(1500));
        assert_eq!(
            (i.bytes_acked, i.bytes_sent, i.data_segs_out),
            (None, None, None)
        );
        // Cut inside a u64: that field is absent too, not half read.
        let mut mid = vec![0u8; BYTES_SENT + 4];
        mid[BYTES_ACKED..BYTES_ACKED + 8].copy_from_slice(&9u64.to_ne_bytes());
        let i = TcpInfo::parse(&mid).unwrap();
        assert_eq!((i.bytes_acked, i.bytes_sent), (Some(9), None));
    }

    /// The counters of a real connection on loopback match what was sent over it.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_loopback_connection_counts_what_it_sent() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let probe = TcpProbe::new(&c).unwrap();
        let before = probe.info().unwrap();
        assert_eq!(before.state, 1, "established");
        const N: usize = 3 << 20;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got.len()
        });
        c.write_all(&vec![0xa5; N]).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(reader.join().unwrap(), N);
        // The last ACKs may come a delayed-ACK timeout after the reader is done.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let after = loop {
            let i = probe.info().unwrap();
            if i.bytes_acked.unwrap() >= N as u64 || std::time::Instant::now() > deadline {
                break i;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The SYN and the FIN count as a byte each once acknowledged.
        let acked = after.bytes_acked.unwrap();
        assert!((N as u64..=N as u64 + 2).contains(&acked), "{after:?}");
        assert!(after.bytes_sent.unwrap() >= N as u64, "{after:?}");
        assert!(
            after.data_segs_out.unwrap() as usize >= N / 65536,
            "{after:?}"
        );
        // Loopback loses nothing, but on a loaded host a tail-loss probe may fire (the
        // demo saw 0.75 % of its segments sent again on a busy 2-core machine).
        assert!(
            after.total_retrans <= after.data_segs_out.unwrap() / 10,
            "{after:?}"
        );
        assert!(after.snd_mss > 0 && after.snd_cwnd > 0, "{after:?}");
        // The probe is a descriptor of its own: the connection's owner dropping its copy
        // does not stop it reading.
        drop(c);
        assert!(probe.info().is_ok());
    }

    #[test]
    fn a_socket_that_is_not_tcp_is_an_error_not_a_panic() {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(tcp_info(&u).is_err());
    }
}
