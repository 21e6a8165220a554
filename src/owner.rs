//! Who is on the other end of a loopback connection: the kernel lists every TCP socket with its
//! owner's uid in /proc/net/tcp{,6}; the client's socket is the row whose local address is the
//! peer address we accepted and whose remote address is our listening address.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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
            let v6 = Ipv6Addr::from(bytes);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
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

/// The uid owning the client socket of an accepted connection, if the kernel shows it here.
pub fn peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let (peer, local) = (canon(peer), canon(local));
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                continue;
            }
            if parse_addr(f[1]) == Some(peer) && parse_addr(f[2]) == Some(local) {
                return f[7].parse().ok();
            }
        }
    }
    None
}

pub fn my_uid() -> u32 {
    unsafe { libc::geteuid() }
}
