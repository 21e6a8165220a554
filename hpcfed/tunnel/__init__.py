"""The job side of the userspace WireGuard tunnel: config, forwards, the foreground runner, status.

The data plane is the compiled extension `hpcfed._tunnel` (boringtun + smoltcp); it is imported
only when a tunnel actually runs, so the rest of hpcfed works without it.
"""
