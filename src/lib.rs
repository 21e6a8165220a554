//! hpcfed's tunnel data plane. The WireGuard peer (boringtun) and the TCP stack (smoltcp)
//! live entirely in this process: no TUN device, no root.
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

mod batch;
mod files;
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
/// is passed in memory). A bad spec raises ValueError, failures RuntimeError, each with a
/// one-line message — a panic too: it must not reach Python as PanicException and a traceback.
#[pyfunction]
fn run(py: Python<'_>, spec_json: &str) -> PyResult<()> {
    let spec = spec::Spec::from_json(spec_json).map_err(PyValueError::new_err)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the runtime: {e}")))?;
    quiet_panics();
    // block_on stays on this (the main) thread, so Python signal handlers can run from the loop.
    let result = py.allow_threads(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(tunnel::run(spec, || Python::with_gil(|py| py.check_signals())))
        }))
    });
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(tunnel::Stop::Tunnel(m))) => Err(PyRuntimeError::new_err(m)),
        Ok(Err(tunnel::Stop::Python(e))) => Err(e),
        Err(payload) => Err(PyRuntimeError::new_err(format!(
            "internal error in the tunnel data plane: {} (please report it)",
            panic_message(&payload)
        ))),
    }
}

/// The default hook prints a multi-line report to stderr; the message reaches the user once,
/// through the exception (HPCFED_TUNNEL_DEBUG=1 keeps the full report).
fn quiet_panics() {
    if !debug() {
        std::panic::set_hook(Box::new(|_| {}));
    }
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into());
    text.lines().next().unwrap_or("panic").to_string()
}

#[pymodule]
fn _tunnel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    Ok(())
}
