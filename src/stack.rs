//! The userspace network: smoltcp's TCP/IP stack over a packet queue that the WireGuard loop
//! (tunnel.rs) fills with decrypted packets and drains to encrypt. Shared with the connection
//! tasks behind one mutex that is never held across an await.
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Packets in and out of the stack: plain IP, no link layer.
pub struct QueueDevice {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

pub struct RxTok(Vec<u8>);
pub struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl<'a> smoltcp::phy::TxToken for TxTok<'a> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _t: SInstant) -> Option<(RxTok, TxTok<'_>)> {
        let p = self.rx.pop_front()?;
        Some((RxTok(p), TxTok(&mut self.tx)))
    }

    fn transmit(&mut self, _t: SInstant) -> Option<TxTok<'_>> {
        Some(TxTok(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

pub struct Listener {
    pub port: u16,
    pub host: String,
    pub host_port: u16,
    pub pool: Vec<SocketHandle>,
}

/// An inbound connection that arrived on a remote-forward port, to be carried to host:port.
pub struct Inbound {
    pub handle: SocketHandle,
    pub host: String,
    pub host_port: u16,
}

#[derive(Default, Clone)]
pub struct Counters {
    pub active: u64,
    pub total: u64,
    /// -L connections from other users (owner not proven).
    pub refused: u64,
    /// -R connections reset because max_connections were already open.
    pub over_limit: u64,
    pub failed: u64,
}

/// Local ports of outbound tunnel connections: handed out round-robin over a wide range (a
/// just-freed port is reused as late as possible, so the far end's TIME_WAIT has passed) and
/// never while a connection still holds it.
pub struct Ports {
    next: u16,
    in_use: HashSet<u16>,
    reserved: HashSet<u16>,
}

impl Ports {
    pub const FIRST: u16 = 10000;
    pub const LAST: u16 = 65535;

    pub fn new(reserved: impl IntoIterator<Item = u16>) -> Ports {
        Ports { next: Self::FIRST, in_use: HashSet::new(), reserved: reserved.into_iter().collect() }
    }

    pub fn take(&mut self) -> Option<u16> {
        for _ in Self::FIRST..=Self::LAST {
            let p = self.next;
            self.next = if p == Self::LAST { Self::FIRST } else { p + 1 };
            if !self.reserved.contains(&p) && self.in_use.insert(p) {
                return Some(p);
            }
        }
        None
    }

    pub fn release(&mut self, p: u16) {
        self.in_use.remove(&p);
    }

    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }
}

pub struct Stack {
    pub iface: Interface,
    pub device: QueueDevice,
    pub sockets: SocketSet<'static>,
    pub listeners: Vec<Listener>,
    /// Finished connections: removed once closed (or after a grace period).
    pub dead: Vec<(SocketHandle, Instant)>,
    pub counters: Counters,
    ports: Ports,
    /// Local port of each outbound connection, released when its socket is removed.
    outbound: HashMap<SocketHandle, u16>,
    /// Connections that arrived through a remote forward and are not finished yet.
    inbound: HashSet<SocketHandle>,
    max_inbound: u64,
    buffer: usize,
}

/// Listening sockets kept per remote-forward port: smoltcp hands each SYN to one listening
/// socket, so a burst of connections needs several before the next poll refills the pool.
const LISTEN_POOL: usize = 16;

impl Stack {
    pub fn new(addr: Ipv4Addr, prefix: u8, mtu: usize, buffer: usize, max_inbound: u64, listen_ports: &[u16]) -> Stack {
        let mut device = QueueDevice { rx: VecDeque::new(), tx: VecDeque::new(), mtu };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand_seed();
        let mut iface = Interface::new(config, &mut device, SInstant::now());
        let a = Ipv4Address::from(addr);
        iface.update_ip_addrs(|ips| {
            ips.push(IpCidr::new(IpAddress::Ipv4(a), prefix)).ok();
        });
        // Everything leaves through the one WireGuard peer (the hub); the gateway address is
        // irrelevant on an IP-medium device.
        iface.routes_mut().add_default_ipv4_route(a).ok();
        Stack {
            iface,
            device,
            sockets: SocketSet::new(vec![]),
            listeners: vec![],
            dead: vec![],
            counters: Counters::default(),
            ports: Ports::new(listen_ports.iter().copied()),
            outbound: HashMap::new(),
            inbound: HashSet::new(),
            max_inbound,
            buffer,
        }
    }

    fn new_socket(&self) -> tcp::Socket<'static> {
        new_socket(self.buffer)
    }

    /// Open an outbound tunnel connection (local forward) to target:port.
    pub fn connect(&mut self, target: Ipv4Addr, port: u16) -> Result<SocketHandle, String> {
        let mut s = self.new_socket();
        let local = self.ports.take().ok_or("connect: every local tunnel port is in use")?;
        if let Err(e) = s.connect(self.iface.context(), (IpAddress::Ipv4(Ipv4Address::from(target)), port), local) {
            self.ports.release(local);
            return Err(format!("connect: {e}"));
        }
        let h = self.sockets.add(s);
        self.outbound.insert(h, local);
        self.counters.active += 1;
        self.counters.total += 1;
        Ok(h)
    }

    /// A connection's bridge ended: account for it and let the socket be reaped once closed.
    pub fn finish(&mut self, h: SocketHandle, failed: bool) {
        if failed {
            self.socket(h).abort();
            self.counters.failed += 1;
        }
        self.counters.active -= 1;
        self.inbound.remove(&h);
        self.dead.push((h, Instant::now()));
    }

    fn remove(&mut self, h: SocketHandle) {
        self.sockets.remove(h);
        if let Some(p) = self.outbound.remove(&h) {
            self.ports.release(p);
        }
    }

    #[cfg(test)]
    pub fn ports_in_use(&self) -> usize {
        self.ports.in_use()
    }

    pub fn add_listener(&mut self, port: u16, host: String, host_port: u16) {
        self.listeners.push(Listener { port, host, host_port, pool: vec![] });
    }

    /// Keep every remote-forward port's pool full; return connections that left Listen.
    pub fn refill_listeners(&mut self) -> Vec<Inbound> {
        let mut fresh = vec![];
        let buffer = self.buffer;
        let pooled: std::collections::HashSet<SocketHandle> =
            self.listeners.iter().flat_map(|l| l.pool.iter().copied()).collect();
        for l in self.listeners.iter_mut() {
            let mut keep = vec![];
            for h in l.pool.drain(..) {
                let s = self.sockets.get::<tcp::Socket>(h);
                match s.state() {
                    tcp::State::Listen => keep.push(h),
                    tcp::State::Closed => {
                        self.sockets.remove(h);
                    }
                    _ => {
                        // A retransmitted SYN of a connection another socket already holds can
                        // land on a listener first (smoltcp tries sockets in slot order): drop
                        // that twin silently, before it answers.
                        let key = (s.local_endpoint(), s.remote_endpoint());
                        let twin = self.sockets.iter().any(|(oh, o)| {
                            oh != h
                                && !pooled.contains(&oh)
                                && matches!(o, smoltcp::socket::Socket::Tcp(t)
                                    if t.state() != tcp::State::Closed
                                        && (t.local_endpoint(), t.remote_endpoint()) == key)
                        });
                        if twin {
                            self.sockets.remove(h);
                        } else if self.inbound.len() as u64 >= self.max_inbound {
                            // over the cap: reset it (the client sees a refused connection)
                            self.sockets.get_mut::<tcp::Socket>(h).abort();
                            self.counters.over_limit += 1;
                            self.dead.push((h, Instant::now()));
                        } else {
                            self.inbound.insert(h);
                            fresh.push(Inbound { handle: h, host: l.host.clone(), host_port: l.host_port });
                        }
                    }
                }
            }
            // no more listeners than connections still allowed: further SYNs get a reset
            let room = self.max_inbound.saturating_sub(self.inbound.len() as u64) as usize;
            while keep.len() < LISTEN_POOL.min(room.max(1)) {
                let mut s = new_socket(buffer);
                if s.listen(l.port).is_err() {
                    break;
                }
                keep.push(self.sockets.add(s));
            }
            l.pool = keep;
        }
        self.counters.active += fresh.len() as u64;
        self.counters.total += fresh.len() as u64;
        fresh
    }

    /// Feed one decrypted packet to the stack right away. Packet by packet, so a burst of SYNs
    /// for a remote forward finds a fresh listener for each one.
    pub fn ingest(&mut self, packet: Vec<u8>) -> Vec<Inbound> {
        self.device.rx.push_back(packet);
        self.iface.poll_ingress_single(SInstant::now(), &mut self.device, &mut self.sockets);
        if !self.listeners.is_empty() {
            self.refill_listeners()
        } else {
            vec![]
        }
    }

    pub fn socket(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Run the TCP/IP stack once; returns how long it may sleep before its next timer.
    pub fn poll(&mut self) -> Option<Duration> {
        let now = SInstant::now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.reap();
        self.iface
            .poll_delay(SInstant::now(), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    fn reap(&mut self) {
        let now = Instant::now();
        let mut keep = vec![];
        for (h, since) in std::mem::take(&mut self.dead) {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            let closed = matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait);
            if closed || now.duration_since(since) > Duration::from_secs(60) {
                if !closed {
                    s.abort();
                    keep.push((h, now - Duration::from_secs(61))); // remove after the RST went out
                    continue;
                }
                self.remove(h);
            } else {
                keep.push((h, since));
            }
        }
        self.dead = keep;
    }
}

fn new_socket(buffer: usize) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; buffer]),
        tcp::SocketBuffer::new(vec![0u8; buffer]),
    );
    s.set_nagle_enabled(false);
    // Without congestion control a full window bursts into the hub, whose UDP socket drops it.
    s.set_congestion_control(tcp::CongestionControl::Cubic);
    // Immediate ACKs: measured ~40 % more throughput through a wireguard-go hub than the 10 ms
    // delayed ACK (benchmarks/bench_tunnel.py); the extra ACK packets are cheap next to data.
    s.set_ack_delay(None);
    // smoltcp sends no zero-window probes: if the peer's window update is lost (a userspace
    // hub drops bursts), the sender would wait forever. A keep-alive draws an ACK carrying the
    // current window, so a stalled connection resumes within a second.
    s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(1)));
    s.set_timeout(Some(smoltcp::time::Duration::from_secs(60))); // unanswered SYN/data: give up
    s
}

fn rand_seed() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u64::from_ne_bytes(b)
}

/// The stack and a way to wake the WireGuard loop when a connection task changed something.
#[derive(Clone)]
pub struct Shared {
    pub stack: Arc<Mutex<Stack>>,
    pub kick: Arc<Notify>,
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Stack> {
        self.stack.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_skip_those_in_use_and_reserved_and_wrap() {
        let mut p = Ports::new([Ports::FIRST + 1]);
        let held = p.take().unwrap();
        assert_eq!(held, Ports::FIRST);
        assert_eq!(p.take(), Some(Ports::FIRST + 2)); // FIRST+1 is a listening port
        // a full cycle later the held port is still not handed out again
        let mut seen = 0;
        for _ in 0..200_000 {
            let q = p.take().unwrap();
            assert_ne!(q, held);
            assert_ne!(q, Ports::FIRST + 1);
            p.release(q);
            seen += 1;
        }
        assert_eq!(seen, 200_000);
        assert_eq!(p.in_use(), 2);
    }

    #[test]
    fn ports_run_out_cleanly() {
        let mut p = Ports::new([]);
        let n = (Ports::LAST - Ports::FIRST) as usize + 1;
        for _ in 0..n {
            assert!(p.take().is_some());
        }
        assert_eq!(p.take(), None);
    }

    fn stack(max_inbound: u64) -> Stack {
        Stack::new(Ipv4Addr::new(10, 220, 0, 2), 32, 1420, 16 * 1024, max_inbound, &[9000])
    }

    #[test]
    fn finished_outbound_connections_give_their_port_back() {
        let mut st = stack(4);
        let h = st.connect(Ipv4Addr::new(10, 220, 0, 3), 80).unwrap();
        assert_eq!((st.ports_in_use(), st.counters.active), (1, 1));
        st.finish(h, true); // failed: aborted, reaped on the next poll
        st.poll();
        st.poll();
        assert_eq!((st.ports_in_use(), st.counters.active, st.counters.failed), (0, 0, 1));
    }

    #[test]
    fn listener_pool_shrinks_to_the_connection_cap() {
        let mut st = stack(3);
        st.add_listener(9000, "127.0.0.1".into(), 9001);
        st.refill_listeners();
        assert_eq!(st.listeners[0].pool.len(), 3);
        let mut st = stack(1000);
        st.add_listener(9000, "127.0.0.1".into(), 9001);
        st.refill_listeners();
        assert_eq!(st.listeners[0].pool.len(), LISTEN_POOL);
    }
}
