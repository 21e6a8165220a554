//! The WireGuard loop: one UDP socket to the hub, boringtun's `Tunn` for the protocol, the
//! smoltcp stack for TCP. Also readiness, the no-egress timeout, liveness and the status file.
use crate::forward;
use crate::spec::{key32, Spec};
use crate::stack::{Shared, Stack};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Notify;

/// Why the loop stopped, for Python to turn into an exit code.
pub enum Stop {
    /// A one-line user-facing error (exit 9).
    Tunnel(String),
    /// Python raised (a signal handler): propagate it.
    Python(pyo3::PyErr),
}

#[derive(Serialize)]
struct Status<'a> {
    pid: u32,
    state: &'a str,
    address: String,
    endpoint: &'a str,
    started_at: f64,
    updated_at: f64,
    handshakes: u64,
    last_handshake_age_s: Option<f64>,
    tx_bytes: usize,
    rx_bytes: usize,
    connections_active: u64,
    connections_total: u64,
    connections_refused: u64,
    connections_failed: u64,
    local_forwards: Vec<String>,
    remote_forwards: Vec<String>,
}

fn epoch() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Write a file readable only by us, atomically (a reader never sees half of it).
pub fn write_private(path: &str, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = format!("{path}.tmp{}", std::process::id());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

pub async fn run(spec: Spec, check_signals: impl Fn() -> Result<(), pyo3::PyErr>) -> Result<(), Stop> {
    let err = |m: String| Stop::Tunnel(m);
    let private = StaticSecret::from(key32(&spec.private_key, "PrivateKey").map_err(err)?);
    let peer = PublicKey::from(key32(&spec.peer_public_key, "peer PublicKey").map_err(err)?);
    let psk = match &spec.preshared_key {
        Some(k) => Some(key32(k, "PresharedKey").map_err(err)?),
        None => None,
    };
    let mut tunn = Tunn::new(private, peer, psk, spec.keepalive, rand_index(), None)
        .map_err(|e| Stop::Tunnel(format!("bad WireGuard keys: {e}")))?;

    let hub: SocketAddr = tokio::net::lookup_host(&spec.endpoint)
        .await
        .ok()
        .and_then(|mut a| a.find(|a| a.is_ipv4()))
        .ok_or_else(|| Stop::Tunnel(format!("cannot resolve the hub endpoint {}", spec.endpoint)))?;
    let udp = UdpSocket::bind(("0.0.0.0", spec.listen_port.unwrap_or(0)))
        .await
        .map_err(|e| Stop::Tunnel(format!("cannot open a UDP socket: {e}")))?;

    grow_buffers(&udp);

    let shared = Shared {
        stack: Arc::new(Mutex::new(Stack::new(spec.address, spec.prefix, spec.mtu, spec.buffer_kib * 1024))),
        kick: Arc::new(Notify::new()),
    };
    for f in &spec.remote_forwards {
        shared.lock().add_listener(f.port, f.host.clone(), f.host_port);
    }
    for f in &spec.local_forwards {
        let l = TcpListener::bind((f.bind.as_str(), f.port)).await.map_err(|e| {
            Stop::Tunnel(format!("cannot listen on {}:{} for -L: {e}", f.bind, f.port))
        })?;
        tokio::spawn(forward::serve_local(shared.clone(), l, f.clone(), spec.allow_other_users));
    }
    let local_desc: Vec<String> = spec
        .local_forwards
        .iter()
        .map(|f| format!("{}:{} -> {}:{}", f.bind, f.port, f.target, f.target_port))
        .collect();
    let remote_desc: Vec<String> = spec.remote_forwards.iter().map(forward::describe_remote).collect();

    let mut wbuf = vec![0u8; 65536 + 256];
    let mut rbuf = vec![0u8; 65536 + 256];
    let started = Instant::now();
    let started_at = epoch();
    let mut last_rx = started;
    let mut last_forced = started;
    let mut handshakes: u64 = 0;
    let mut prev_age: Option<Duration> = None;
    let mut ready = false;
    let mut next_tick = started;
    let mut next_status = started;
    let liveness = Duration::from_secs_f64(spec.liveness);
    let hs_timeout = Duration::from_secs_f64(spec.handshake_timeout);

    // Start the handshake now rather than on the first packet: readiness should not wait.
    if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut wbuf, false) {
        let _ = udp.send_to(p, hub).await;
    }

    let mut fresh = vec![]; // inbound connections accepted while reading datagrams
    let result = loop {
        // 1. Run the stack and send what it produced.
        let (out, delay, inbound) = {
            let mut st = shared.lock();
            let mut delay = st.poll();
            let mut inbound = st.refill_listeners();
            inbound.extend(fresh.drain(..));
            if !inbound.is_empty() {
                delay = Some(Duration::ZERO); // fresh listeners must answer the next SYNs
            }
            let out: Vec<Vec<u8>> = st.device.tx.drain(..).collect();
            (out, delay, inbound)
        };
        for inb in inbound {
            tokio::spawn(forward::serve_inbound(shared.clone(), inb));
        }
        for p in out {
            if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(&p, &mut wbuf) {
                let _ = udp.send_to(d, hub).await;
            }
        }

        // 2. Wait for a datagram, a connection task, a stack timer or our own tick.
        let now = Instant::now();
        let mut wait = next_tick.saturating_duration_since(now);
        if let Some(d) = delay {
            wait = wait.min(d);
        }
        tokio::select! {
            r = udp.recv_from(&mut rbuf) => {
                if let Ok((n, from)) = r {
                    if from == hub || from.ip() == hub.ip() {
                        let got = self::on_datagram(&mut tunn, &udp, hub, &rbuf[..n], &mut wbuf, &shared, &mut fresh).await;
                        if got { last_rx = Instant::now(); }
                    }
                    // Drain whatever else already arrived before running the stack again.
                    for _ in 0..64 {
                        match udp.try_recv_from(&mut rbuf) {
                            Ok((n, from)) if from.ip() == hub.ip() => {
                                if self::on_datagram(&mut tunn, &udp, hub, &rbuf[..n], &mut wbuf, &shared, &mut fresh).await {
                                    last_rx = Instant::now();
                                }
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                }
            }
            _ = shared.kick.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }

        // 3. Timers, at most every 100 ms.
        let now = Instant::now();
        if now < next_tick {
            continue;
        }
        next_tick = now + Duration::from_millis(100);
        if let Err(e) = check_signals() {
            break Err(Stop::Python(e));
        }
        match tunn.update_timers(&mut wbuf) {
            TunnResult::WriteToNetwork(p) => {
                let _ = udp.send_to(p, hub).await;
            }
            _ => {}
        }
        let (age, tx, rx, _, _) = tunn.stats();
        if let Some(a) = age {
            if prev_age.map_or(true, |p| a + Duration::from_millis(500) < p) {
                handshakes += 1;
                if !ready {
                    ready = true;
                    eprintln!(
                        "hpcfed tunnel: up: {} via hub {} after {:.0} ms",
                        spec.address,
                        spec.endpoint,
                        now.duration_since(started).as_secs_f64() * 1000.0
                    );
                    if let Some(rf) = &spec.ready_file {
                        let body = format!(
                            "{{\"address\": \"{}\", \"pid\": {}, \"ready_at\": {}}}\n",
                            spec.address,
                            std::process::id(),
                            epoch()
                        );
                        if let Err(e) = write_private(rf, body.as_bytes()) {
                            break Err(Stop::Tunnel(format!("cannot write the ready file {rf}: {e}")));
                        }
                    }
                }
            }
        }
        prev_age = age;
        if !ready && now.duration_since(started) >= hs_timeout {
            break Err(Stop::Tunnel(format!(
                "no UDP egress to the hub {}: no WireGuard handshake within {:.0}s \
                 (UDP to the hub blocked, hub down, or this peer's public key is not registered there)",
                spec.endpoint, spec.handshake_timeout
            )));
        }
        // Silent hub: it restarted (lost our session) or our address changed. Re-handshake.
        if now.duration_since(last_rx) >= liveness && now.duration_since(last_forced) >= Duration::from_secs(5) {
            last_forced = now;
            if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut wbuf, true) {
                let _ = udp.send_to(p, hub).await;
            }
        }
        if now >= next_status {
            next_status = now + Duration::from_secs(1);
            if crate::debug() {
                let mut st = shared.lock();
                for (_, sock) in st.sockets.iter_mut() {
                    let smoltcp::socket::Socket::Tcp(t) = sock;
                    {
                        if t.state() != smoltcp::socket::tcp::State::Listen {
                            eprintln!(
                                "hpcfed tunnel: debug: {} {:?} -> {:?} send_queue={} recv_queue={}",
                                t.state(), t.local_endpoint(), t.remote_endpoint(), t.send_queue(), t.recv_queue()
                            );
                        }
                    }
                }
            }
            if let Some(sf) = &spec.status_file {
                let c = shared.lock().counters.clone();
                let st = Status {
                    pid: std::process::id(),
                    state: if ready { "up" } else { "connecting" },
                    address: spec.address.to_string(),
                    endpoint: &spec.endpoint,
                    started_at,
                    updated_at: epoch(),
                    handshakes,
                    last_handshake_age_s: age.map(|a| a.as_secs_f64()),
                    tx_bytes: tx,
                    rx_bytes: rx,
                    connections_active: c.active,
                    connections_total: c.total,
                    connections_refused: c.refused,
                    connections_failed: c.failed,
                    local_forwards: local_desc.clone(),
                    remote_forwards: remote_desc.clone(),
                };
                if let Ok(j) = serde_json::to_vec_pretty(&st) {
                    let _ = write_private(sf, &j);
                }
            }
        }
    };
    if let Some(rf) = &spec.ready_file {
        let _ = std::fs::remove_file(rf);
    }
    result
}

/// One datagram from the hub. Returns whether it was authentic WireGuard traffic.
async fn on_datagram(
    tunn: &mut Tunn,
    udp: &UdpSocket,
    hub: SocketAddr,
    data: &[u8],
    wbuf: &mut [u8],
    shared: &Shared,
    fresh: &mut Vec<crate::stack::Inbound>,
) -> bool {
    let mut first = true;
    let mut authentic = false;
    loop {
        let input: &[u8] = if first { data } else { &[] };
        let r = tunn.decapsulate(Some(hub.ip()), input, wbuf);
        first = false;
        match r {
            TunnResult::WriteToNetwork(p) => {
                authentic = true;
                let _ = udp.send_to(p, hub).await;
                // repeat with an empty datagram until Done: flushes packets queued for a session
            }
            TunnResult::WriteToTunnelV4(p, _src) => {
                fresh.extend(shared.lock().ingest(p.to_vec()));
                return true;
            }
            TunnResult::WriteToTunnelV6(..) | TunnResult::Done => return true,
            TunnResult::Err(_) => return authentic,
        }
    }
}

/// Bigger UDP buffers than the 208 KiB default absorb bursts of many connections. Unprivileged
/// processes get at most net.core.{r,w}mem_max; the FORCE variants work for root.
fn grow_buffers(udp: &UdpSocket) {
    use std::os::fd::AsRawFd;
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
