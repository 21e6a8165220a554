//! The userspace network: smoltcp's TCP/IP stack over a packet queue that the WireGuard loop
//! (tunnel.rs) fills with decrypted packets and drains to encrypt. Shared with the connection
//! tasks behind one mutex that is never held across an await.
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use std::collections::VecDeque;
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
    pub refused: u64,
    pub failed: u64,
}

pub struct Stack {
    pub iface: Interface,
    pub device: QueueDevice,
    pub sockets: SocketSet<'static>,
    pub listeners: Vec<Listener>,
    /// Finished connections: removed once closed (or after a grace period).
    pub dead: Vec<(SocketHandle, Instant)>,
    pub counters: Counters,
    next_port: u16,
    buffer: usize,
}

/// Listening sockets kept per remote-forward port: smoltcp hands each SYN to one listening
/// socket, so a burst of connections needs several before the next poll refills the pool.
const LISTEN_POOL: usize = 16;
const EPHEMERAL: std::ops::Range<u16> = 40000..60000;

impl Stack {
    pub fn new(addr: Ipv4Addr, prefix: u8, mtu: usize, buffer: usize) -> Stack {
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
            next_port: EPHEMERAL.start,
            buffer,
        }
    }

    fn new_socket(&self) -> tcp::Socket<'static> {
        new_socket(self.buffer)
    }

    /// Open an outbound tunnel connection (local forward) to target:port.
    pub fn connect(&mut self, target: Ipv4Addr, port: u16) -> Result<SocketHandle, String> {
        let mut s = self.new_socket();
        let local = self.next_port;
        self.next_port = if local + 1 >= EPHEMERAL.end { EPHEMERAL.start } else { local + 1 };
        s.connect(self.iface.context(), (IpAddress::Ipv4(Ipv4Address::from(target)), port), local)
            .map_err(|e| format!("connect: {e}"))?;
        Ok(self.sockets.add(s))
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
                        } else {
                            fresh.push(Inbound { handle: h, host: l.host.clone(), host_port: l.host_port });
                        }
                    }
                }
            }
            while keep.len() < LISTEN_POOL {
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
        for (h, since) in self.dead.drain(..) {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            let closed = matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait);
            if closed || now.duration_since(since) > Duration::from_secs(60) {
                if !closed {
                    s.abort();
                    keep.push((h, now - Duration::from_secs(61))); // remove after the RST went out
                    continue;
                }
                self.sockets.remove(h);
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
