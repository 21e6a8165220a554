//! Port forwards: a local TCP connection spliced to a tunnel (smoltcp) connection, both ways,
//! with half-close carried across and resets propagated.
use crate::owner::{self, Client};
use crate::spec::{LocalForward, RemoteForward};
use crate::stack::{Inbound, Shared};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, RecvError};
use std::future::poll_fn;
use std::collections::BTreeSet;
use std::task::Poll;
use std::time::{Duration, Instant};
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
    shared.lock().finish(h, failed);
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

/// Refusals are logged at most once per interval (the first one at once, then a count), so a
/// neighbour hammering the port cannot flood the owner's job log.
pub struct RefusalLog {
    interval: Duration,
    last: Option<Instant>,
    pending: u64,
    uids: BTreeSet<String>,
}

impl RefusalLog {
    pub fn new(interval: Duration) -> RefusalLog {
        RefusalLog { interval, last: None, pending: 0, uids: BTreeSet::new() }
    }

    /// Record a refusal; returns a line to log now, if any.
    pub fn refuse(&mut self, now: Instant, who: String, what: &str) -> Option<String> {
        if self.last.map_or(true, |t| now.duration_since(t) >= self.interval) && self.pending == 0 {
            self.last = Some(now);
            return Some(format!("refused connection to {what} from {who}"));
        }
        self.pending += 1;
        if self.uids.len() < 8 {
            self.uids.insert(who);
        }
        self.flush(now, what)
    }

    /// The count of refusals not logged yet, once the interval has passed.
    pub fn flush(&mut self, now: Instant, what: &str) -> Option<String> {
        if self.pending == 0 || self.last.is_some_and(|t| now.duration_since(t) < self.interval) {
            return None;
        }
        let since = self.last.map(|t| now.duration_since(t).as_secs_f64()).unwrap_or(0.0);
        let line = format!(
            "refused {} more connections to {what} in the last {since:.0}s (from {})",
            self.pending,
            self.uids.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        self.pending = 0;
        self.uids.clear();
        self.last = Some(now);
        Some(line)
    }
}

/// Accept loop of one local forward: each allowed connection becomes a tunnel connection.
pub async fn serve_local(shared: Shared, listener: TcpListener, fwd: LocalForward, allow_other: bool) {
    let me = owner::my_uid();
    let mut lookup = owner::Lookup::new();
    let what = format!("{}:{}", fwd.bind, fwd.port);
    let rule = format!("only uid {me} may use this forward");
    let mut refusals = RefusalLog::new(Duration::from_secs(10));
    let mut flush = tokio::time::interval(Duration::from_secs(10));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = flush.tick() => {
                if let Some(line) = refusals.flush(Instant::now(), &what) {
                    eprintln!("hpcfed tunnel: {line}; {rule}");
                }
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // e.g. out of file descriptors: back off instead of spinning
                eprintln!("hpcfed tunnel: accept on {what} failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if !allow_other {
            let client = match stream.local_addr() {
                Ok(local) => lookup.client(peer, local),
                Err(_) => Client::NotFound,
            };
            if client != Client::Owner(me) {
                shared.lock().counters.refused += 1;
                let who = client.describe();
                if let Some(line) = refusals.refuse(Instant::now(), format!("{peer} ({who})"), &what) {
                    eprintln!("hpcfed tunnel: {line}; {rule}");
                }
                reset(&stream);
                continue;
            }
        }
        let h = match shared.lock().connect(fwd.target, fwd.target_port) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("hpcfed tunnel: {e}");
                reset(&stream);
                continue;
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
            shared.lock().finish(inb.handle, true);
            shared.kick.notify_one();
        }
    }
}

pub fn describe_remote(f: &RemoteForward) -> String {
    format!("{} -> {}:{}", f.port, f.host, f.host_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_once_then_counted_per_interval() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(Duration::from_secs(10));
        assert!(log.refuse(t0, "a (uid 5)".into(), "x").unwrap().starts_with("refused connection to x from a"));
        let mut lines = 0;
        for i in 1..5000u64 {
            let t = t0 + Duration::from_millis(i); // 5,000 refusals within 5 s
            lines += log.refuse(t, format!("p{} (uid 5)", i % 3), "x").is_some() as u32;
        }
        assert_eq!(lines, 0);
        assert_eq!(log.flush(t0 + Duration::from_secs(5), "x"), None);
        let line = log.flush(t0 + Duration::from_secs(11), "x").unwrap();
        assert!(line.starts_with("refused 4999 more connections to x in the last 11s"), "{line}");
        assert_eq!(log.flush(t0 + Duration::from_secs(30), "x"), None); // nothing new
    }
}
