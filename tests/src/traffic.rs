//! Real UDP traffic between the sandbox's namespaces: paced senders and a counting receiver.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::netns::NetNs;

pub const SERVER_PORT: u16 = 9000;

/// A UDP socket in the server namespace counting datagrams per source address.
pub struct Receiver {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<HashMap<IpAddr, u64>>>,
}

impl Receiver {
    pub fn start(server: &NetNs, bind: &str) -> Result<Receiver> {
        let addr: SocketAddr = bind.parse().context("receiver bind address")?;
        let socket = server.run(move || UdpSocket::bind(addr))??;
        set_rcvbuf(&socket, 8 << 20);
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut counts = HashMap::new();
            let mut buf = [0u8; 2048];
            // Stop only once asked and nothing more arrives for one read timeout.
            loop {
                match socket.recv_from(&mut buf) {
                    // A dual-stack socket reports IPv4 sources as ::ffff:a.b.c.d.
                    Ok((_, from)) => *counts.entry(from.ip().to_canonical()).or_insert(0) += 1,
                    Err(_) if stop_flag.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            counts
        });
        Ok(Receiver {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops after the queue drains and returns datagrams received per source.
    pub fn finish(mut self) -> HashMap<IpAddr, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("receiver thread"))
            .unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn set_rcvbuf(socket: &UdpSocket, bytes: i32) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket we own, with a valid int option.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            std::mem::size_of::<i32>() as u32,
        );
    }
}

/// What a paced sender did.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub packets: u64,
    /// From the first send to the last.
    pub elapsed: Duration,
}

/// The longest any paced sender runs.
pub const SEND_CAP: Duration = Duration::from_secs(60);

/// Sends `count` datagrams of `payload` bytes from `source` to `dest` in the client
/// namespace, at `pps` (0: as fast as possible). Bounded by count and by [`SEND_CAP`].
pub fn send_udp(
    client: &NetNs,
    source: &str,
    dest: &str,
    count: u64,
    pps: u64,
    payload: usize,
) -> Result<Sent> {
    send_paced(client, source, dest, count, pps, payload, None)
}

/// As [`send_udp`], until `stop` is set (or [`SEND_CAP`] passes): for a sender that must
/// outlast something whose duration the test cannot know beforehand.
pub fn send_udp_until(
    client: &NetNs,
    source: &str,
    dest: &str,
    pps: u64,
    payload: usize,
    stop: Arc<AtomicBool>,
) -> Result<Sent> {
    send_paced(client, source, dest, u64::MAX, pps, payload, Some(stop))
}

fn send_paced(
    client: &NetNs,
    source: &str,
    dest: &str,
    count: u64,
    pps: u64,
    payload: usize,
    stop: Option<Arc<AtomicBool>>,
) -> Result<Sent> {
    let source: IpAddr = source.parse().context("source address")?;
    let dest: SocketAddr = dest.parse().context("destination address")?;
    client.run(move || -> Result<Sent> {
        let socket = UdpSocket::bind(SocketAddr::new(source, 0))
            .with_context(|| format!("binding {source}"))?;
        let data = vec![0x5a; payload];
        let start = Instant::now();
        let mut sent = 0;
        let mut last = start;
        let stopped = || stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed));
        while sent < count && start.elapsed() < SEND_CAP && !stopped() {
            if pps > 0 {
                let due = start + Duration::from_secs_f64(sent as f64 / pps as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            match socket.send_to(&data, dest) {
                Ok(_) => {
                    sent += 1;
                    last = Instant::now();
                }
                // The socket's send queue is full: wait for the veth to drain it.
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOBUFS)
                        || e.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e) => return Err(e).with_context(|| format!("sending from {source}")),
            }
        }
        Ok(Sent {
            packets: sent,
            elapsed: last - start,
        })
    })?
}

/// Sends `count` copies of a raw Ethernet `frame` out of `ifname` in the client namespace
/// through an AF_PACKET socket (for non-IP frames such as ARP or LLDP).
pub fn send_raw(client: &NetNs, ifname: &str, frame: &[u8], count: u64) -> Result<u64> {
    Ok(send_raw_rounds(client, ifname, vec![frame.to_vec()], count)?.0)
}

/// Sends `frames` out of `ifname` in the client namespace through one AF_PACKET socket,
/// `rounds` times over; returns (frames sent, elapsed). For floods from many (spoofed)
/// sources, which need no addresses on the client.
pub fn send_raw_rounds(
    client: &NetNs,
    ifname: &str,
    frames: Vec<Vec<u8>>,
    rounds: u64,
) -> Result<(u64, std::time::Duration)> {
    let ifname = std::ffi::CString::new(ifname)?;
    client.run(move || -> Result<(u64, std::time::Duration)> {
        // SAFETY: plain libc socket calls on values we own; the fd is closed below.
        unsafe {
            let ifindex = libc::if_nametoindex(ifname.as_ptr());
            anyhow::ensure!(ifindex != 0, "no interface {ifname:?}");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            anyhow::ensure!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            let started = Instant::now();
            let mut sent = 0;
            for _ in 0..rounds {
                for frame in &frames {
                    let n = libc::sendto(
                        fd,
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&raw const addr).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    if n == frame.len() as isize {
                        sent += 1;
                    }
                }
            }
            let elapsed = started.elapsed();
            libc::close(fd);
            Ok((sent, elapsed))
        }
    })?
}
