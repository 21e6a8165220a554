//! Who is on the other end of a loopback connection. The kernel is asked about that one socket
//! (netlink sock_diag, an exact lookup by 4-tuple: O(1), no matter how many sockets the node
//! has); /proc/net/tcp{,6} is scanned only where sock_diag is unavailable.
//!
//! An owner is *proven* only for a live socket that still has a file (inode != 0): a client
//! that already closed leaves a TIME_WAIT or orphaned socket, which the kernel lists with uid 0
//! — for a tunnel run as root that would look like its own. Unproven means refused.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const TCP_TIME_WAIT: u8 = 6;
const TCP_LISTEN: u8 = 10;

/// What the kernel says about the client's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockInfo {
    pub state: u8,
    pub uid: u32,
    pub inode: u32,
}

impl SockInfo {
    /// The uid that provably owns the socket, or None (closed, orphaned, time-wait).
    pub fn owner(&self) -> Option<u32> {
        (self.inode != 0 && self.state != TCP_TIME_WAIT && self.state != TCP_LISTEN)
            .then_some(self.uid)
    }

    fn client(&self) -> Client {
        self.owner().map_or(Client::Closed, Client::Owner)
    }
}

/// What the kernel proves about the client of an accepted connection. `Closed` is common and
/// harmless: a liveness probe (Fed-BioMed's node connects and closes at once) is gone before
/// the accept loop asks; its owner cannot be proven, so it is refused all the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Owner(u32),
    Closed,
    NotFound,
}

impl Client {
    /// How a refusal names it in the tunnel's log.
    pub fn describe(&self) -> String {
        match self {
            Client::Owner(uid) => format!("uid {uid}"),
            Client::Closed => "closed before it was accepted: owner unprovable".into(),
            Client::NotFound => "an unproven owner".into(),
        }
    }
}

/// The IPv4 address as an IPv6 socket sees it (::ffff:a.b.c.d), None for IPv6 addresses.
fn mapped(a: SocketAddr) -> Option<SocketAddr> {
    match a.ip() {
        IpAddr::V4(v4) => Some(SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port())),
        IpAddr::V6(_) => None,
    }
}

fn canon(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        _ => a,
    }
}

// ---- netlink sock_diag (linux/inet_diag.h) ----
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDR: usize = 16;
const REQ_LEN: usize = NLMSG_HDR + 56; // nlmsghdr + inet_diag_req_v2
const MSG_LEN: usize = 72; // inet_diag_msg

/// One netlink socket, reused for every lookup of a forward's accept loop.
pub struct Lookup {
    fd: Option<OwnedFd>,
    seq: u32,
}

fn ip_words(ip: IpAddr) -> [u8; 16] {
    let mut w = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => w[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => w.copy_from_slice(&v6.octets()),
    }
    w
}

/// The request for the socket whose local end is `src` and remote end `dst`.
fn request(seq: u32, src: SocketAddr, dst: SocketAddr) -> [u8; REQ_LEN] {
    let mut b = [0u8; REQ_LEN];
    b[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    let r = &mut b[NLMSG_HDR..];
    r[0] = if src.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    };
    r[1] = libc::IPPROTO_TCP as u8;
    r[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    let id = &mut r[8..];
    id[0..2].copy_from_slice(&src.port().to_be_bytes());
    id[2..4].copy_from_slice(&dst.port().to_be_bytes());
    id[4..20].copy_from_slice(&ip_words(src.ip()));
    id[20..36].copy_from_slice(&ip_words(dst.ip()));
    id[40..48].copy_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    b
}

/// Parse the kernel's answer: Some(info) for the socket asked about, None for "no such socket"
/// or anything that does not match the request exactly (the kernel falls back to a listener).
fn parse_reply(buf: &[u8], seq: u32, req: &[u8; REQ_LEN]) -> Option<SockInfo> {
    if buf.len() < NLMSG_HDR {
        return None;
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    let got_seq = u32::from_ne_bytes(buf[8..12].try_into().ok()?);
    if ty != SOCK_DIAG_BY_FAMILY || got_seq != seq || buf.len() < NLMSG_HDR + MSG_LEN {
        return None;
    }
    let m = &buf[NLMSG_HDR..];
    // the socket id must be the one asked for: ports and addresses
    if m[4..40] != req[NLMSG_HDR + 8..NLMSG_HDR + 44] {
        return None;
    }
    Some(SockInfo {
        state: m[1],
        uid: u32::from_ne_bytes(m[64..68].try_into().ok()?),
        inode: u32::from_ne_bytes(m[68..72].try_into().ok()?),
    })
}

pub enum Answer {
    Found(SockInfo),
    NoSuchSocket,
    /// sock_diag is not usable here: fall back to /proc.
    Unavailable,
}

impl Lookup {
    pub fn new() -> Lookup {
        Lookup { fd: None, seq: 0 }
    }

    fn socket(&mut self) -> Option<i32> {
        if self.fd.is_none() {
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                    libc::NETLINK_SOCK_DIAG,
                )
            };
            if fd < 0 {
                return None;
            }
            self.fd = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// Ask the kernel about the TCP socket with local end `src`, remote end `dst`.
    pub fn query(&mut self, src: SocketAddr, dst: SocketAddr) -> Answer {
        let Some(fd) = self.socket() else {
            return Answer::Unavailable;
        };
        self.seq = self.seq.wrapping_add(1);
        let req = request(self.seq, src, dst);
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        let sent = unsafe {
            libc::sendto(
                fd,
                req.as_ptr() as *const libc::c_void,
                req.len(),
                0,
                &kernel as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent != req.len() as isize {
            self.fd = None;
            return Answer::Unavailable;
        }
        // sock_diag answers while handling the request, so the reply is already queued
        // (MSG_DONTWAIT: never block the data plane on it).
        let mut buf = [0u8; 512];
        loop {
            let n = unsafe {
                libc::recv(
                    fd,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                self.fd = None;
                return Answer::Unavailable;
            }
            let msg = &buf[..n as usize];
            if msg.len() >= NLMSG_HDR
                && u32::from_ne_bytes(msg[8..12].try_into().unwrap()) != self.seq
            {
                continue; // a stale answer to an earlier question
            }
            if msg.len() >= NLMSG_HDR + 4 && u16::from_ne_bytes([msg[4], msg[5]]) == NLMSG_ERROR {
                let errno = -i32::from_ne_bytes(msg[16..20].try_into().unwrap());
                return if errno == libc::ENOENT {
                    Answer::NoSuchSocket
                } else {
                    Answer::Unavailable
                };
            }
            return match parse_reply(msg, self.seq, &req) {
                Some(info) => Answer::Found(info),
                None => Answer::NoSuchSocket,
            };
        }
    }

    /// The client socket of an accepted connection: its proven owner, or why there is none.
    /// `peer` is the client's address as we accepted it, `local` our listening address.
    pub fn client(&mut self, peer: SocketAddr, local: SocketAddr) -> Client {
        let (peer, local) = (canon(peer), canon(local));
        match self.query(peer, local) {
            Answer::Found(info) => info.client(),
            // A dual-stack (AF_INET6) client talking IPv4 — gRPC's default, so every NVFlare
            // and Flower client — is listed by the kernel under IPv6 with v4-mapped addresses.
            Answer::NoSuchSocket => match (mapped(peer), mapped(local)) {
                (Some(p6), Some(l6)) => match self.query(p6, l6) {
                    Answer::Found(info) => info.client(),
                    _ => Client::NotFound,
                },
                _ => Client::NotFound,
            },
            Answer::Unavailable => {
                proc_lookup(peer, local).map_or(Client::NotFound, |i| i.client())
            }
        }
    }
}

// ---- /proc/net/tcp fallback ----
fn parse_addr(field: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = field.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let ip = match ip_hex.len() {
        8 => {
            // printed as the in-memory (network-order) u32 read as a host integer
            let v = u32::from_str_radix(ip_hex, 16).ok()?;
            IpAddr::V4(Ipv4Addr::from(v.to_ne_bytes()))
        }
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                let v = u32::from_str_radix(&ip_hex[i * 8..i * 8 + 8], 16).ok()?;
                bytes[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(canon(SocketAddr::new(ip, port)))
}

fn proc_lookup(peer: SocketAddr, local: SocketAddr) -> Option<SockInfo> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            if parse_addr(f[1]) == Some(peer) && parse_addr(f[2]) == Some(local) {
                return Some(SockInfo {
                    state: u8::from_str_radix(f[3], 16).ok()?,
                    uid: f[7].parse().ok()?,
                    inode: f[9].parse().ok()?,
                });
            }
        }
    }
    None
}

pub fn my_uid() -> u32 {
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream, SocketAddr, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let local = s.local_addr().unwrap();
        (c, s, peer, local)
    }

    #[test]
    fn finds_the_client_socket_and_its_owner() {
        let (_c, _s, peer, local) = pair();
        let mut l = Lookup::new();
        match l.query(peer, local) {
            Answer::Found(info) => {
                assert_eq!(info.uid, my_uid());
                assert_ne!(info.inode, 0);
                assert_eq!(info.state, 1); // established
            }
            _ => panic!("sock_diag did not find a live loopback socket"),
        }
        assert_eq!(l.client(peer, local), Client::Owner(my_uid()));
        // the /proc fallback agrees
        assert_eq!(
            proc_lookup(peer, local).and_then(|i| i.owner()),
            Some(my_uid())
        );
    }

    #[test]
    fn a_dual_stack_client_is_found_under_ipv6() {
        // What gRPC does: an AF_INET6 socket connecting to an IPv4 listener (v4-mapped).
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = socket2_v6_connect(port);
        let (_s, peer) = l.accept().unwrap();
        let local = l.local_addr().unwrap();
        assert_eq!(Lookup::new().client(peer, local), Client::Owner(my_uid()));
        drop(c);
    }

    /// An AF_INET6 TCP socket connected to 127.0.0.1:port through its v4-mapped address.
    fn socket2_v6_connect(port: u16) -> TcpStream {
        TcpStream::connect(SocketAddr::new(
            IpAddr::V6(std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
            port,
        ))
        .unwrap()
    }

    #[test]
    fn a_closed_client_is_not_proven() {
        let (c, s, peer, local) = pair();
        drop(c); // client closes first: its socket becomes an orphan, then TIME_WAIT
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut &s, &mut buf);
        drop(s);
        std::thread::sleep(std::time::Duration::from_millis(50));
        // unproven, and named for what it is in the refusal's log line (not an unknown owner)
        assert_eq!(Lookup::new().client(peer, local), Client::Closed);
    }

    #[test]
    fn a_probe_that_closes_before_the_accept_is_closed_not_unknown() {
        // Fed-BioMed's is_server_alive: connect, then close at once; the accept comes later.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        drop(TcpStream::connect(l.local_addr().unwrap()).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (_s, peer) = l.accept().unwrap();
        let got = Lookup::new().client(peer, l.local_addr().unwrap());
        assert_eq!(got, Client::Closed);
        assert!(got.describe().starts_with("closed before it was accepted"));
    }

    #[test]
    fn an_unknown_tuple_is_not_found_and_listeners_do_not_match() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let there = l.local_addr().unwrap();
        let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        // the kernel's exact lookup falls back to a listener on `src`: that must not count
        assert!(matches!(
            Lookup::new().query(there, nowhere),
            Answer::NoSuchSocket
        ));
        assert_eq!(Lookup::new().client(there, nowhere), Client::NotFound);
    }

    #[test]
    fn owner_rules() {
        assert_eq!(
            SockInfo {
                state: 1,
                uid: 5,
                inode: 9
            }
            .owner(),
            Some(5)
        );
        assert_eq!(
            SockInfo {
                state: 5,
                uid: 5,
                inode: 9
            }
            .owner(),
            Some(5)
        ); // FIN_WAIT2, still open
        assert_eq!(
            SockInfo {
                state: TCP_TIME_WAIT,
                uid: 0,
                inode: 0
            }
            .owner(),
            None
        );
        assert_eq!(
            SockInfo {
                state: 4,
                uid: 0,
                inode: 0
            }
            .owner(),
            None
        ); // orphan
    }

    #[test]
    fn parses_proc_addresses() {
        assert_eq!(
            parse_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_addr("0000000000000000FFFF00000100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
    }
}
