//! hpcfed's tunnel data plane. The WireGuard peer (boringtun) and the TCP stack (smoltcp)
//! live entirely in this process: no TUN device, no root.
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

mod forward;
mod owner;
mod spec;
mod stack;
mod tunnel;

/// HPCFED_TUNNEL_DEBUG=1: log why connections end abnormally.
pub(crate) fn debug() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("HPCFED_TUNNEL_DEBUG").is_some_and(|v| v == "1"))
}

/// Version of the compiled data plane, so `hpcfed doctor` can tell a stale build.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Run the tunnel in the foreground until a Python signal handler raises (SIGTERM/SIGINT) or
/// the tunnel fails. `spec_json` is validated by hpcfed.tunnel (it holds the private key, so it
/// is passed in memory). Failures raise RuntimeError with a one-line message.
#[pyfunction]
fn run(py: Python<'_>, spec_json: &str) -> PyResult<()> {
    let spec: spec::Spec =
        serde_json::from_str(spec_json).map_err(|e| PyValueError::new_err(format!("bad tunnel spec: {e}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the runtime: {e}")))?;
    // block_on stays on this (the main) thread, so Python signal handlers can run from the loop.
    let result = py.allow_threads(|| {
        rt.block_on(tunnel::run(spec, || Python::with_gil(|py| py.check_signals())))
    });
    match result {
        Ok(()) => Ok(()),
        Err(tunnel::Stop::Tunnel(m)) => Err(PyRuntimeError::new_err(m)),
        Err(tunnel::Stop::Python(e)) => Err(e),
    }
}

#[pymodule]
fn _tunnel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    Ok(())
}
