"""Deployments the user submitted, kept as one JSON file each in the state directory.

The state directory usually sits on an NFS home shared by several login nodes, so: no SQLite,
no flock. Every write goes to a unique temporary file in the same directory and is renamed over
the record (rename is atomic on NFS too); read-modify-write sequences take a lease lock made by
an exclusive create (see lock.py).
"""

from hpcfed.state.store import Deployment, DeploymentStore

__all__ = ["Deployment", "DeploymentStore"]
