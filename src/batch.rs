//! Batched UDP I/O to the hub: many WireGuard datagrams per system call (`sendmmsg`,
//! `recvmmsg`). One `sendto`/`recvfrom` per datagram cost more system time than the crypto, and
//! a peer that trickles single datagrams makes a userspace hub wake up for each one.
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;

/// Fixed-size slots for datagrams, filled and drained in order.
pub struct Slots {
    buf: Vec<u8>,
    slot: usize,
    /// Length of the datagram in each used slot.
    pub lens: Vec<usize>,
    /// Sender of each received datagram.
    pub from: Vec<Option<SocketAddr>>,
    /// Datagrams longer than a slot that the kernel cut (dropped by the caller).
    pub truncated: Vec<bool>,
}

impl Slots {
    pub fn new(count: usize, slot: usize) -> Slots {
        Slots { buf: vec![0u8; count * slot], slot, lens: vec![0; count], from: vec![None; count], truncated: vec![false; count] }
    }

    pub fn count(&self) -> usize {
        self.lens.len()
    }

    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.buf[i * self.slot..(i + 1) * self.slot]
    }

    pub fn get(&self, i: usize) -> &[u8] {
        &self.buf[i * self.slot..i * self.slot + self.lens[i]]
    }
}

fn sockaddr_v4(a: &SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    }
}

/// Send slots[from..to] to `to_addr` with as few `sendmmsg` calls as the kernel allows.
/// Returns how many were sent; stops at the first error (WouldBlock included).
pub fn send(fd: RawFd, slots: &mut Slots, range: std::ops::Range<usize>, to_addr: &SocketAddrV4) -> io::Result<usize> {
    let mut addr = sockaddr_v4(to_addr);
    let n = range.len();
    if n == 0 {
        return Ok(0);
    }
    let mut iov: Vec<libc::iovec> = range
        .clone()
        .map(|i| libc::iovec { iov_base: slots.slot_mut(i).as_mut_ptr() as *mut libc::c_void, iov_len: slots.lens[i] })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|v| {
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = &mut addr as *mut libc::sockaddr_in as *mut libc::c_void;
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = v as *mut libc::iovec;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Receive up to `slots.count()` datagrams without blocking; fills lens/from/truncated.
/// Returns how many arrived (Err(WouldBlock) when none).
pub fn recv(fd: RawFd, slots: &mut Slots) -> io::Result<usize> {
    let n = slots.count();
    let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; n];
    let mut iov: Vec<libc::iovec> = (0..n)
        .map(|i| {
            let s = slots.slot_mut(i);
            libc::iovec { iov_base: s.as_mut_ptr() as *mut libc::c_void, iov_len: s.len() }
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..n)
        .map(|i| {
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = &mut names[i] as *mut libc::sockaddr_storage as *mut libc::c_void;
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut iov[i] as *mut libc::iovec;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let r = unsafe { libc::recvmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = r as usize;
    for i in 0..got {
        let h = &msgs[i];
        slots.lens[i] = (h.msg_len as usize).min(slots.slot);
        slots.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        slots.from[i] = from_storage(&names[i]);
    }
    Ok(got)
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    if s.ss_family as libc::c_int == libc::AF_INET {
        let a: &libc::sockaddr_in = unsafe { &*(s as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
        let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
        Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_goes_out_and_comes_back_in_order_with_the_sender() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(to) = rx.local_addr().unwrap() else { panic!() };
        let mut out = Slots::new(8, 2048);
        for i in 0..5 {
            let s = out.slot_mut(i);
            s[..3].copy_from_slice(&[i as u8, 1, 2]);
            out.lens[i] = 3 + i * 100;
        }
        assert_eq!(send(tx.as_raw_fd(), &mut out, 0..5, &to).unwrap(), 5);
        let mut inb = Slots::new(4, 2048);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(recv(rx.as_raw_fd(), &mut inb).unwrap(), 4); // no more than the slots
        for i in 0..4 {
            assert_eq!(inb.get(i)[0], i as u8);
            assert_eq!(inb.lens[i], 3 + i * 100);
            assert_eq!(inb.from[i], Some(tx.local_addr().unwrap()));
            assert!(!inb.truncated[i]);
        }
        assert_eq!(recv(rx.as_raw_fd(), &mut inb).unwrap(), 1);
        assert_eq!(inb.get(0)[0], 4);
        let e = recv(rx.as_raw_fd(), &mut inb).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_datagram_longer_than_a_slot_is_marked_truncated() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[7u8; 3000], rx.local_addr().unwrap()).unwrap();
        let mut inb = Slots::new(2, 2048);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(recv(rx.as_raw_fd(), &mut inb).unwrap(), 1);
        assert!(inb.truncated[0]);
    }
}
