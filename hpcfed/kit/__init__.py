"""Startup kits: fetch them from the federation's NVFlare dashboard, check them, keep them.

One module per step: `dashboard` talks to the dashboard's REST API, `archive` unpacks the
PIN-protected zip safely, `checks` decides whether a kit may be trusted, `store` installs kits
atomically under the user's data directory and keeps the trust-on-first-use pins, `pull` ties
those together for `hpcfed kit pull`, and `workspace` turns a (read-only) kit into a writable
NVFlare workspace inside a Slurm job.
"""
