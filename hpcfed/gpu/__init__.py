"""GPUs: which ones Slurm gave the job (assignment.py), and whether they can be trusted (preflight.py)."""
