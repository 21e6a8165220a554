//! What Python hands the data plane: an already-validated tunnel spec (JSON, never argv, because
//! it carries the private key). Unknown fields are an error: a Python side and a data plane from
//! different builds must not silently ignore each other's settings.
use serde::Deserialize;
use std::net::Ipv4Addr;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LocalForward {
    pub bind: String,
    pub port: u16,
    pub target: Ipv4Addr,
    pub target_port: u16,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RemoteForward {
    pub port: u16,
    pub host: String,
    pub host_port: u16,
}

/// Longest timer the data plane accepts (seconds): beyond this Duration arithmetic overflows.
pub const MAX_SECONDS: f64 = 1e9;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub private_key: String,
    pub peer_public_key: String,
    pub preshared_key: Option<String>,
    pub endpoint: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub mtu: usize,
    pub keepalive: Option<u16>,
    pub listen_port: Option<u16>,
    #[serde(default)]
    pub local_forwards: Vec<LocalForward>,
    #[serde(default)]
    pub remote_forwards: Vec<RemoteForward>,
    pub ready_file: Option<String>,
    pub status_file: Option<String>,
    /// The config file this tunnel runs (absolute path), shown by `hpcfed tunnel status`.
    #[serde(default)]
    pub config: Option<String>,
    pub handshake_timeout: f64,
    /// Re-handshake when nothing authenticated came from the hub for this long (hub restarted,
    /// our address changed): WireGuard alone only notices when it has data to send.
    pub liveness: f64,
    pub allow_other_users: bool,
    /// smoltcp per-connection buffer, each direction. Bounded on purpose: large bursts overflow
    /// a userspace hub's UDP socket and throughput collapses.
    pub buffer_kib: usize,
    /// At most this many connections at once through the remote forwards (-R); more are reset.
    #[serde(default = "default_max_connections")]
    pub max_connections: u64,
}

fn default_max_connections() -> u64 {
    1024
}

impl Spec {
    pub fn from_json(text: &str) -> Result<Spec, String> {
        let spec: Spec = serde_json::from_str(text).map_err(|e| format!("bad tunnel spec: {e}"))?;
        spec.check()?;
        Ok(spec)
    }

    /// Values the data plane cannot work with (Python checks them first, this is the backstop).
    fn check(&self) -> Result<(), String> {
        for (name, v) in [("handshake_timeout", self.handshake_timeout), ("liveness", self.liveness)] {
            if !(v.is_finite() && v > 0.0 && v <= MAX_SECONDS) {
                return Err(format!("bad tunnel spec: {name} must be a number of seconds in (0, {MAX_SECONDS:e}], got {v}"));
            }
        }
        if !(16..=16384).contains(&self.buffer_kib) {
            return Err(format!("bad tunnel spec: buffer_kib must be 16-16384, got {}", self.buffer_kib));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(format!("bad tunnel spec: mtu must be 576-9000, got {}", self.mtu));
        }
        if self.max_connections == 0 {
            return Err("bad tunnel spec: max_connections must be at least 1".into());
        }
        Ok(())
    }
}

pub fn key32(b64: &str, what: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| format!("{what} is not base64"))?;
    raw.try_into().map_err(|_| format!("{what} is not 32 bytes"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> serde_json::Value {
        serde_json::json!({
            "private_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "peer_public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "preshared_key": null, "endpoint": "127.0.0.1:9", "address": "10.221.0.5", "prefix": 32,
            "mtu": 1420, "keepalive": null, "listen_port": null, "local_forwards": [],
            "remote_forwards": [{"port": 9000, "host": "127.0.0.1", "host_port": 9001}],
            "ready_file": null, "status_file": null, "config": "/x/wg.conf",
            "handshake_timeout": 30.0, "liveness": 60.0, "allow_other_users": false, "buffer_kib": 256,
            "max_connections": 1024
        })
    }

    #[test]
    fn accepts_what_python_sends() {
        let s = Spec::from_json(&sample().to_string()).unwrap();
        assert_eq!(s.remote_forwards[0].host_port, 9001);
        assert_eq!(s.config.as_deref(), Some("/x/wg.conf"));
    }

    #[test]
    fn rejects_unknown_fields_at_every_level() {
        let mut v = sample();
        v["bufer_kib"] = 1.into();
        assert!(Spec::from_json(&v.to_string()).unwrap_err().contains("unknown field `bufer_kib`"));
        let mut v = sample();
        v["remote_forwards"][0]["hots"] = "x".into();
        assert!(Spec::from_json(&v.to_string()).unwrap_err().contains("unknown field `hots`"));
    }

    #[test]
    fn rejects_timers_that_would_overflow() {
        for bad in [1e300, -1.0, 0.0] {
            let mut v = sample();
            v["liveness"] = bad.into();
            assert!(Spec::from_json(&v.to_string()).unwrap_err().contains("liveness"), "{bad}");
        }
    }

    #[test]
    fn key32_checks_length_and_encoding() {
        assert!(key32("AAAA", "k").unwrap_err().contains("32 bytes"));
        assert!(key32("!!", "k").unwrap_err().contains("base64"));
    }
}
