//! The WireGuard loop: one UDP socket to the hub, boringtun's `Tunn` for the protocol, the
//! smoltcp stack for TCP. Also readiness, the no-egress timeout, liveness and the status file.
//!
//! `run` only wires the parts together: `Wire` (UDP + WireGuard), `Health` (handshakes,
//! readiness, liveness: pure, unit-tested), `StatusFile` (what `hpcfed tunnel status` reads).
use crate::batch::{self, Slots};
use crate::files::write_private;
use crate::forward;
use crate::spec::{key32, Spec};
use crate::stack::{Counters, Inbound, Shared, Stack};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::Serialize;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::Interest;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Notify;

/// Why the loop stopped, for Python to turn into an exit code.
pub enum Stop {
    /// A one-line user-facing error (exit 9).
    Tunnel(String),
    /// Python raised (a signal handler): propagate it.
    Python(pyo3::PyErr),
}

fn epoch() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Datagrams sent in one `sendmmsg` at most, and received per `recvmmsg`. How many leave at
/// once is bounded by the congestion window (src/vendor/README.md): a userspace hub's UDP socket
/// at the kernel default buffer (208 KiB) holds only ~80 full datagrams.
const SEND_BATCH: usize = 64;
const RECV_BATCH: usize = 64;
/// recvmmsg calls per wakeup before the stack runs again (ACKs and window updates go out).
const RECV_ROUNDS: usize = 4;

/// The UDP socket to the hub and the WireGuard session on it.
struct Wire {
    tunn: Tunn,
    udp: UdpSocket,
    hub: SocketAddr,
    hub4: SocketAddrV4,
    /// Handshakes, cookies and decrypted packets.
    wbuf: Vec<u8>,
    /// Encrypted datagrams waiting for one sendmmsg.
    out: Slots,
    out_n: usize,
    /// Datagrams from one recvmmsg.
    inb: Slots,
    /// Datagrams sent to / received from the hub (packets per byte is what a hub pays for).
    tx_datagrams: u64,
    rx_datagrams: u64,
}

impl Wire {
    async fn open(spec: &Spec) -> Result<Wire, Stop> {
        let err = |m: String| Stop::Tunnel(m);
        let private = StaticSecret::from(key32(&spec.private_key, "PrivateKey").map_err(err)?);
        let peer = PublicKey::from(key32(&spec.peer_public_key, "peer PublicKey").map_err(err)?);
        let psk = match &spec.preshared_key {
            Some(k) => Some(key32(k, "PresharedKey").map_err(err)?),
            None => None,
        };
        let tunn = Tunn::new(private, peer, psk, spec.keepalive, rand_index(), None)
            .map_err(|e| Stop::Tunnel(format!("bad WireGuard keys: {e}")))?;
        let hub: SocketAddr = tokio::net::lookup_host(&spec.endpoint)
            .await
            .ok()
            .and_then(|mut a| a.find(|a| a.is_ipv4()))
            .ok_or_else(|| Stop::Tunnel(format!("cannot resolve the hub endpoint {}", spec.endpoint)))?;
        let SocketAddr::V4(hub4) = hub else { unreachable!("the hub address is IPv4") };
        let udp = UdpSocket::bind(("0.0.0.0", spec.listen_port.unwrap_or(0)))
            .await
            .map_err(|e| Stop::Tunnel(format!("cannot open a UDP socket: {e}")))?;
        grow_buffers(&udp);
        // An encrypted packet is the IP packet + 32 bytes (header, tag) + padding to 16 bytes.
        // Received datagrams may come from a hub with a larger MTU: room for 4 KiB at least,
        // longer ones are dropped (our TCP never asks for them: its MSS follows our MTU).
        let out_slot = (spec.mtu + 64).max(256);
        let in_slot = (spec.mtu + 64).max(4096);
        Ok(Wire {
            tunn,
            udp,
            hub,
            hub4,
            wbuf: vec![0u8; 65536 + 256],
            out: Slots::new(SEND_BATCH, out_slot),
            out_n: 0,
            inb: Slots::new(RECV_BATCH, in_slot),
            tx_datagrams: 0,
            rx_datagrams: 0,
        })
    }

    /// Start (or restart) the handshake now rather than on the first packet.
    async fn handshake(&mut self, force: bool) {
        if let TunnResult::WriteToNetwork(p) = self.tunn.format_handshake_initiation(&mut self.wbuf, force) {
            let _ = self.udp.send_to(p, self.hub).await;
        }
    }

    /// Encrypt and send what the stack produced, many datagrams per system call.
    async fn send_packets(&mut self, packets: &[Vec<u8>]) {
        for p in packets {
            if self.out.slot_mut(self.out_n).len() < p.len() + 64 {
                continue; // larger than our MTU: the stack never makes one
            }
            if let TunnResult::WriteToNetwork(d) = self.tunn.encapsulate(p, self.out.slot_mut(self.out_n)) {
                let n = d.len();
                self.out.lens[self.out_n] = n;
                self.out_n += 1;
                if self.out_n == self.out.count() {
                    self.flush().await;
                }
            }
        }
        self.flush().await;
    }

    async fn flush(&mut self) {
        let fd = self.udp.as_raw_fd();
        let mut done = 0;
        while done < self.out_n {
            let (out, hub4, end) = (&mut self.out, &self.hub4, self.out_n);
            match self.udp.async_io(Interest::WRITABLE, || batch::send(fd, out, done..end, hub4)).await {
                Ok(n) => {
                    done += n;
                    self.tx_datagrams += n as u64;
                }
                Err(_) => done += 1, // this datagram cannot go (e.g. no route): drop it, like a lossy link
            }
        }
        self.out_n = 0;
    }

    async fn timers(&mut self) {
        if let TunnResult::WriteToNetwork(p) = self.tunn.update_timers(&mut self.wbuf) {
            let _ = self.udp.send_to(p, self.hub).await;
        }
    }

    /// Datagram `i` of the last batch. Returns whether it was authentic WireGuard traffic from
    /// the hub.
    async fn on_datagram(&mut self, i: usize, shared: &Shared, fresh: &mut Vec<Inbound>) -> bool {
        if self.inb.truncated[i] || self.inb.from[i].map(|a| a.ip()) != Some(self.hub.ip()) {
            return false;
        }
        self.rx_datagrams += 1;
        let mut input: &[u8] = self.inb.get(i);
        let mut authentic = false;
        loop {
            let r = self.tunn.decapsulate(Some(self.hub.ip()), input, &mut self.wbuf);
            input = &[];
            match r {
                TunnResult::WriteToNetwork(p) => {
                    authentic = true;
                    let _ = self.udp.send_to(p, self.hub).await;
                    // repeat with an empty datagram until Done: flushes packets queued for a session
                }
                TunnResult::WriteToTunnelV4(p, _src) => {
                    fresh.extend(shared.lock().ingest(p));
                    return true;
                }
                TunnResult::WriteToTunnelV6(..) | TunnResult::Done => return true,
                TunnResult::Err(_) => return authentic,
            }
        }
    }

    /// The socket is readable: take what arrived, in batches, before running the stack again.
    /// Returns whether anything authentic came from the hub.
    async fn received(&mut self, shared: &Shared, fresh: &mut Vec<Inbound>) -> bool {
        let fd = self.udp.as_raw_fd();
        let mut heard = false;
        for _ in 0..RECV_ROUNDS {
            let inb = &mut self.inb;
            let n = match self.udp.try_io(Interest::READABLE, || batch::recv(fd, inb)) {
                Ok(n) => n,
                Err(_) => break, // WouldBlock: readiness cleared, the next wait is a real one
            };
            for i in 0..n {
                heard |= self.on_datagram(i, shared, fresh).await;
            }
        }
        heard
    }
}

/// Handshakes, readiness and liveness: decisions only, no I/O.
struct Health {
    started: Instant,
    last_rx: Instant,
    last_forced: Instant,
    prev_age: Option<Duration>,
    handshakes: u64,
    ready: bool,
    liveness: Duration,
    handshake_timeout: Duration,
}

impl Health {
    fn new(now: Instant, liveness: Duration, handshake_timeout: Duration) -> Health {
        Health { started: now, last_rx: now, last_forced: now, prev_age: None, handshakes: 0, ready: false, liveness, handshake_timeout }
    }

    fn heard(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// boringtun reports the age of the last handshake; a drop means a new one completed.
    /// Returns true exactly once: when the first handshake made the tunnel ready.
    fn observe(&mut self, age: Option<Duration>) -> bool {
        let mut became_ready = false;
        if let Some(a) = age {
            if self.prev_age.map_or(true, |p| a + Duration::from_millis(500) < p) {
                self.handshakes += 1;
                became_ready = !self.ready;
                self.ready = true;
            }
        }
        self.prev_age = age;
        became_ready
    }

    fn timed_out(&self, now: Instant) -> bool {
        !self.ready && now.duration_since(self.started) >= self.handshake_timeout
    }

    /// Silent hub: it restarted (lost our session) or our address changed. Re-handshake, at
    /// most every 5 s.
    fn should_rehandshake(&mut self, now: Instant) -> bool {
        if now.duration_since(self.last_rx) >= self.liveness && now.duration_since(self.last_forced) >= Duration::from_secs(5) {
            self.last_forced = now;
            return true;
        }
        false
    }
}

#[derive(Serialize)]
struct Status<'a> {
    pid: u32,
    host: &'a str,
    config: Option<&'a str>,
    state: &'a str,
    address: String,
    endpoint: &'a str,
    started_at: f64,
    updated_at: f64,
    handshakes: u64,
    last_handshake_age_s: Option<f64>,
    tx_bytes: usize,
    rx_bytes: usize,
    tx_datagrams: u64,
    rx_datagrams: u64,
    connections_active: u64,
    connections_total: u64,
    connections_refused: u64,
    connections_over_limit: u64,
    connections_failed: u64,
    local_forwards: &'a [String],
    remote_forwards: &'a [String],
}

/// What `hpcfed tunnel status` reads (0600 JSON, rewritten every second).
struct StatusFile {
    path: Option<String>,
    host: String,
    started_at: f64,
    local: Vec<String>,
    remote: Vec<String>,
}

impl StatusFile {
    fn new(spec: &Spec) -> StatusFile {
        StatusFile {
            path: spec.status_file.clone(),
            host: hostname(),
            started_at: epoch(),
            local: spec.local_forwards.iter().map(|f| format!("{}:{} -> {}:{}", f.bind, f.port, f.target, f.target_port)).collect(),
            remote: spec.remote_forwards.iter().map(forward::describe_remote).collect(),
        }
    }

    fn render(&self, spec: &Spec, health: &Health, wire: &Wire, c: &Counters) -> Vec<u8> {
        let (age, tx, rx, _, _) = wire.tunn.stats();
        let st = Status {
            pid: std::process::id(),
            host: &self.host,
            config: spec.config.as_deref(),
            state: if health.ready { "up" } else { "connecting" },
            address: spec.address.to_string(),
            endpoint: &spec.endpoint,
            started_at: self.started_at,
            updated_at: epoch(),
            handshakes: health.handshakes,
            last_handshake_age_s: age.map(|a| a.as_secs_f64()),
            tx_bytes: tx,
            rx_bytes: rx,
            tx_datagrams: wire.tx_datagrams,
            rx_datagrams: wire.rx_datagrams,
            connections_active: c.active,
            connections_total: c.total,
            connections_refused: c.refused,
            connections_over_limit: c.over_limit,
            connections_failed: c.failed,
            local_forwards: &self.local,
            remote_forwards: &self.remote,
        };
        serde_json::to_vec_pretty(&st).unwrap_or_default()
    }

    fn write(&self, body: &[u8]) {
        if let Some(p) = &self.path {
            let _ = write_private(p, body);
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn ready_body(spec: &Spec) -> String {
    format!("{{\"address\": \"{}\", \"pid\": {}, \"ready_at\": {}}}\n", spec.address, std::process::id(), epoch())
}

fn no_egress(spec: &Spec) -> String {
    format!(
        "no UDP egress to the hub {}: no WireGuard handshake within {:.0}s \
         (UDP to the hub blocked, hub down, or this peer's public key is not registered there)",
        spec.endpoint, spec.handshake_timeout
    )
}

/// The stack and the forwards' listeners.
async fn open_stack(spec: &Spec) -> Result<Shared, Stop> {
    let listen_ports: Vec<u16> = spec.remote_forwards.iter().map(|f| f.port).collect();
    let stack = Stack::new(spec.address, spec.prefix, spec.mtu, spec.buffer_kib * 1024, spec.max_connections, &listen_ports);
    let shared = Shared { stack: Arc::new(Mutex::new(stack)), kick: Arc::new(Notify::new()) };
    for f in &spec.remote_forwards {
        shared.lock().add_listener(f.port, f.host.clone(), f.host_port);
    }
    for f in &spec.local_forwards {
        let l = listen(&f.bind, f.port)
            .await
            .map_err(|e| Stop::Tunnel(format!("cannot listen on {}:{} for -L: {e}", f.bind, f.port)))?;
        tokio::spawn(forward::serve_local(shared.clone(), l, f.clone(), spec.allow_other_users));
    }
    Ok(shared)
}

/// A -L listener with a deep accept queue: a burst of connections (1,000 at once) must wait
/// for the accept loop, not overflow the kernel's queue and be reset (tokio's default is 1024).
async fn listen(bind: &str, port: u16) -> std::io::Result<TcpListener> {
    let addr = tokio::net::lookup_host((bind, port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

/// Run the stack once: packets to send, how long it may sleep, new inbound connections.
fn pump(shared: &Shared, fresh: &mut Vec<Inbound>) -> (Vec<Vec<u8>>, Option<Duration>, Vec<Inbound>) {
    let mut st = shared.lock();
    let mut delay = st.poll();
    let mut inbound = st.refill_listeners();
    inbound.append(fresh);
    if !inbound.is_empty() {
        delay = Some(Duration::ZERO); // fresh listeners must answer the next SYNs
    }
    let out = std::mem::take(&mut st.device.tx);
    (out, delay, inbound)
}

fn debug_dump(shared: &Shared) {
    let mut st = shared.lock();
    for (_, sock) in st.sockets.iter_mut() {
        let smoltcp::socket::Socket::Tcp(t) = sock;
        if t.state() != smoltcp::socket::tcp::State::Listen {
            eprintln!(
                "hpcfed tunnel: debug: {} {:?} -> {:?} send_queue={} recv_queue={}",
                t.state(), t.local_endpoint(), t.remote_endpoint(), t.send_queue(), t.recv_queue()
            );
        }
    }
}

/// Every forwarded connection holds a local socket: raise the soft open-file limit to the hard
/// one (often 1024 -> 1M), or a busy forward fails at ~1,000 connections.
fn raise_nofile_limit() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

pub async fn run(spec: Spec, check_signals: impl Fn() -> Result<(), pyo3::PyErr>) -> Result<(), Stop> {
    raise_nofile_limit();
    let mut wire = Wire::open(&spec).await?;
    let shared = open_stack(&spec).await?;
    let status = StatusFile::new(&spec);
    let now = Instant::now();
    let mut health = Health::new(now, Duration::from_secs_f64(spec.liveness), Duration::from_secs_f64(spec.handshake_timeout));
    let (mut next_tick, mut next_status) = (now, now);
    wire.handshake(false).await;

    let mut fresh = vec![]; // inbound connections accepted while reading datagrams
    let result = loop {
        // 1. Let the connection tasks woken by what arrived run first (they drain receive
        //    buffers and fill send buffers), so the stack's answer carries their data and the
        //    reopened window in one segment instead of a bare ACK followed by more.
        tokio::task::yield_now().await;
        // 2. Run the stack and send what it produced.
        let (out, delay, inbound) = pump(&shared, &mut fresh);
        for inb in inbound {
            tokio::spawn(forward::serve_inbound(shared.clone(), inb));
        }
        wire.send_packets(&out).await;
        shared.lock().device.recycle(out);

        // 3. Wait for a datagram, a connection task, a stack timer or our own tick.
        let mut wait = next_tick.saturating_duration_since(Instant::now());
        if let Some(d) = delay {
            wait = wait.min(d);
        }
        tokio::select! {
            // only the wait is cancelled by the other branches, never the handling
            r = wire.udp.readable() => if r.is_ok() {
                if wire.received(&shared, &mut fresh).await {
                    health.heard(Instant::now());
                }
            },
            _ = shared.kick.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }

        // 4. Timers, at most every 100 ms.
        let now = Instant::now();
        if now < next_tick {
            continue;
        }
        next_tick = now + Duration::from_millis(100);
        if let Err(e) = check_signals() {
            break Err(Stop::Python(e));
        }
        wire.timers().await;
        if health.observe(wire.tunn.stats().0) {
            eprintln!(
                "hpcfed tunnel: up: {} via hub {} after {:.0} ms",
                spec.address,
                spec.endpoint,
                now.duration_since(health.started).as_secs_f64() * 1000.0
            );
            if let Some(rf) = &spec.ready_file {
                if let Err(e) = write_private(rf, ready_body(&spec).as_bytes()) {
                    break Err(Stop::Tunnel(format!("cannot write the ready file {rf}: {e}")));
                }
            }
        }
        if health.timed_out(now) {
            break Err(Stop::Tunnel(no_egress(&spec)));
        }
        if health.should_rehandshake(now) {
            wire.handshake(true).await;
        }
        if now >= next_status {
            next_status = now + Duration::from_secs(1);
            if crate::debug() {
                debug_dump(&shared);
            }
            let counters = shared.lock().counters.clone();
            status.write(&status.render(&spec, &health, &wire, &counters));
        }
    };
    if let Some(rf) = &spec.ready_file {
        let _ = std::fs::remove_file(rf);
    }
    result
}

/// Bigger UDP buffers than the 208 KiB default absorb bursts of many connections. Unprivileged
/// processes get at most net.core.{r,w}mem_max; the FORCE variants work for root.
fn grow_buffers(udp: &UdpSocket) {
    let size: libc::c_int = 4 << 20;
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        for opt in [force, plain] {
            let r = unsafe {
                libc::setsockopt(
                    udp.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &size as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                break;
            }
        }
    }
}

fn rand_index() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u32::from_ne_bytes(b) >> 8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> (Health, Instant) {
        let t0 = Instant::now();
        (Health::new(t0, Duration::from_secs(5), Duration::from_secs(30)), t0)
    }

    #[test]
    fn first_handshake_makes_ready_once_and_later_ones_are_counted() {
        let (mut h, _) = health();
        assert!(!h.observe(None));
        assert!(h.observe(Some(Duration::from_millis(3))));
        assert!(!h.observe(Some(Duration::from_secs(60)))); // ageing, no new handshake
        assert!(!h.observe(Some(Duration::from_millis(1)))); // a re-handshake: counted, not "ready" again
        assert_eq!((h.handshakes, h.ready), (2, true));
    }

    #[test]
    fn no_handshake_within_the_timeout_is_a_failure_only_before_ready() {
        let (mut h, t0) = health();
        assert!(!h.timed_out(t0 + Duration::from_secs(29)));
        assert!(h.timed_out(t0 + Duration::from_secs(30)));
        h.observe(Some(Duration::ZERO));
        assert!(!h.timed_out(t0 + Duration::from_secs(300)));
    }

    #[test]
    fn silence_forces_a_rehandshake_at_most_every_five_seconds() {
        let (mut h, t0) = health();
        assert!(!h.should_rehandshake(t0 + Duration::from_secs(4)));
        assert!(h.should_rehandshake(t0 + Duration::from_secs(6)));
        assert!(!h.should_rehandshake(t0 + Duration::from_secs(8)));
        assert!(h.should_rehandshake(t0 + Duration::from_secs(11)));
        h.heard(t0 + Duration::from_secs(12));
        assert!(!h.should_rehandshake(t0 + Duration::from_secs(16)));
    }

    #[test]
    fn status_names_host_config_and_counters() {
        let spec = Spec::from_json(&crate::spec::tests::sample().to_string()).unwrap();
        let (h, _) = health();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let Ok(wire) = rt.block_on(Wire::open(&spec)) else { panic!("cannot open the wire") };
        let c = Counters { active: 1, total: 7, refused: 2, over_limit: 3, failed: 0 };
        let s = StatusFile::new(&spec);
        let v: serde_json::Value = serde_json::from_slice(&s.render(&spec, &h, &wire, &c)).unwrap();
        assert_eq!(v["tx_datagrams"], 0);
        assert_eq!(v["host"], hostname());
        assert_eq!(v["config"], "/x/wg.conf");
        assert_eq!(v["state"], "connecting");
        assert_eq!((v["connections_total"].as_u64(), v["connections_over_limit"].as_u64()), (Some(7), Some(3)));
        assert_eq!(v["remote_forwards"][0], "9000 -> 127.0.0.1:9001");
    }
}
