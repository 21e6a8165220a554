"""Roles in Apptainer containers: the exec argv a job runs (apptainer.py), role images (images.py)."""
