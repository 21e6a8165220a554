"""hpcfed: federated-learning roles as Apptainer containers in Slurm GPU jobs."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("hpcfed")
except Exception:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
