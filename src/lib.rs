//! hpcfed's tunnel data plane. The WireGuard peer (boringtun) and the TCP stack (smoltcp)
//! live entirely in this process: no TUN device, no root.
use pyo3::prelude::*;

/// Version of the compiled data plane, so `hpcfed doctor` can tell a stale build.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _tunnel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
