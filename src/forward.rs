//! Port forwards: a local TCP connection spliced to a tunnel (smoltcp) connection, both ways,
//! with half-close carried across and resets propagated.
use crate::owner;
use crate::spec::{LocalForward, RemoteForward};
use crate::stack::{Inbound, Shared};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, RecvError};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::task::Poll;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 64 * 1024;

enum Down {
    Data(usize),
    Eof,
    Reset,
}

/// Splice `stream` and the tunnel socket `h` until both directions ended.
pub async fn bridge(shared: Shared, mut stream: TcpStream, h: SocketHandle) {
    let _ = stream.set_nodelay(true);
    let why = splice(&shared, &mut stream, h).await;
    let failed = why.is_some();
    if let Some(why) = why {
        if crate::debug() {
            let st = shared.lock().sockets.get::<tcp::Socket>(h).state();
            eprintln!("hpcfed tunnel: connection failed: {why} (tunnel socket {st})");
        }
    }
    {
        let mut st = shared.lock();
        if failed {
            st.socket(h).abort();
            st.counters.failed += 1;
        }
        st.counters.active -= 1;
        st.dead.push((h, std::time::Instant::now()));
    }
    shared.kick.notify_one();
    if failed {
        reset(&stream);
    }
}

/// SO_LINGER 0: close with a reset, so the local side sees the tunnel connection failed.
#[allow(deprecated)]
fn reset(stream: &TcpStream) {
    let _ = stream.set_linger(Some(std::time::Duration::ZERO));
}

/// Returns why the connection failed (reset on either side), None when it closed cleanly.
async fn splice(sh: &Shared, stream: &mut TcpStream, h: SocketHandle) -> Option<&'static str> {
    let (mut rd, mut wr) = stream.split();
    // local -> tunnel
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let room = poll_fn(|cx| {
                let mut st = sh.lock();
                let s = st.socket(h);
                if s.can_send() {
                    Poll::Ready(Ok(s.send_capacity() - s.send_queue()))
                } else if matches!(s.state(), tcp::State::SynSent | tcp::State::SynReceived)
                    || s.may_send()
                {
                    s.register_send_waker(cx.waker());
                    Poll::Pending
                } else {
                    Poll::Ready(Err("tunnel side stopped accepting data"))
                }
            })
            .await?;
            let n = rd.read(&mut buf[..room.min(CHUNK)]).await;
            let mut st = sh.lock();
            let s = st.socket(h);
            match n {
                Ok(0) => {
                    s.close(); // FIN after queued data: the half-close crosses the tunnel
                    drop(st);
                    sh.kick.notify_one();
                    return Ok::<(), &'static str>(());
                }
                Ok(n) => {
                    let _ = s.send_slice(&buf[..n]);
                    drop(st);
                    sh.kick.notify_one();
                }
                Err(_) => return Err("local read failed"),
            }
        }
    };
    // tunnel -> local
    let down = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let r = poll_fn(|cx| {
                let mut st = sh.lock();
                let s = st.socket(h);
                if matches!(s.state(), tcp::State::SynSent | tcp::State::SynReceived) {
                    s.register_recv_waker(cx.waker());
                    return Poll::Pending;
                }
                match s.recv_slice(&mut buf) {
                    Ok(0) => {
                        s.register_recv_waker(cx.waker());
                        Poll::Pending
                    }
                    Ok(n) => Poll::Ready(Down::Data(n)),
                    Err(RecvError::Finished) => Poll::Ready(Down::Eof),
                    Err(RecvError::InvalidState) => Poll::Ready(Down::Reset),
                }
            })
            .await;
            match r {
                Down::Data(n) => {
                    sh.kick.notify_one(); // our receive window opened
                    if wr.write_all(&buf[..n]).await.is_err() {
                        return Err("local write failed");
                    }
                }
                Down::Eof => {
                    let _ = wr.shutdown().await;
                    return Ok::<(), &'static str>(());
                }
                Down::Reset => return Err("tunnel side reset"),
            }
        }
    };
    tokio::pin!(up);
    tokio::pin!(down);
    let (mut up_done, mut down_done, mut failed) = (false, false, None);
    while !(up_done && down_done) && failed.is_none() {
        tokio::select! {
            r = &mut up, if !up_done => { up_done = true; failed = r.err(); }
            r = &mut down, if !down_done => { down_done = true; failed = r.err(); }
        }
    }
    failed
}

/// Accept loop of one local forward: each allowed connection becomes a tunnel connection.
pub async fn serve_local(shared: Shared, listener: TcpListener, fwd: LocalForward, allow_other: bool) {
    let me = owner::my_uid();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // e.g. out of file descriptors: back off instead of spinning
                eprintln!("hpcfed tunnel: accept on {}:{} failed: {e}", fwd.bind, fwd.port);
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        if !allow_other {
            let local: SocketAddr = match stream.local_addr() {
                Ok(a) => a,
                Err(_) => continue,
            };
            let uid = owner::peer_uid(peer, local);
            if uid != Some(me) {
                shared.lock().counters.refused += 1;
                let who = uid.map(|u| format!("uid {u}")).unwrap_or_else(|| "an unknown owner".into());
                eprintln!(
                    "hpcfed tunnel: refused connection to {}:{} from {peer} ({who}; only uid {me} may use this forward)",
                    fwd.bind, fwd.port
                );
                reset(&stream);
                continue;
            }
        }
        let h = {
            let mut st = shared.lock();
            match st.connect(fwd.target, fwd.target_port) {
                Ok(h) => {
                    st.counters.active += 1;
                    st.counters.total += 1;
                    h
                }
                Err(e) => {
                    eprintln!("hpcfed tunnel: {e}");
                    continue;
                }
            }
        };
        shared.kick.notify_one();
        tokio::spawn(bridge(shared.clone(), stream, h));
    }
}

/// An inbound tunnel connection on a remote-forward port: connect to the local service.
pub async fn serve_inbound(shared: Shared, inb: Inbound) {
    match TcpStream::connect((inb.host.as_str(), inb.host_port)).await {
        Ok(stream) => bridge(shared, stream, inb.handle).await,
        Err(e) => {
            eprintln!(
                "hpcfed tunnel: remote forward: cannot reach {}:{}: {e}",
                inb.host, inb.host_port
            );
            let mut st = shared.lock();
            st.socket(inb.handle).abort();
            st.counters.active -= 1;
            st.counters.failed += 1;
            st.dead.push((inb.handle, std::time::Instant::now()));
            drop(st);
            shared.kick.notify_one();
        }
    }
}

pub fn describe_remote(f: &RemoteForward) -> String {
    format!("{} -> {}:{}", f.port, f.host, f.host_port)
}
