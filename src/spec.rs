//! What Python hands the data plane: an already-validated tunnel spec (JSON, never argv, because
//! it carries the private key).
use serde::Deserialize;
use std::net::Ipv4Addr;

#[derive(Deserialize, Debug, Clone)]
pub struct LocalForward {
    pub bind: String,
    pub port: u16,
    pub target: Ipv4Addr,
    pub target_port: u16,
}

#[derive(Deserialize, Debug, Clone)]
pub struct RemoteForward {
    pub port: u16,
    pub host: String,
    pub host_port: u16,
}

#[derive(Deserialize, Debug, Clone)]
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
    pub handshake_timeout: f64,
    /// Re-handshake when nothing authenticated came from the hub for this long (hub restarted,
    /// our address changed): WireGuard alone only notices when it has data to send.
    pub liveness: f64,
    pub allow_other_users: bool,
    /// smoltcp per-connection buffer, each direction. Bounded on purpose: large bursts overflow
    /// a userspace hub's UDP socket and throughput collapses.
    pub buffer_kib: usize,
}

pub fn key32(b64: &str, what: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| format!("{what} is not base64"))?;
    raw.try_into().map_err(|_| format!("{what} is not 32 bytes"))
}
