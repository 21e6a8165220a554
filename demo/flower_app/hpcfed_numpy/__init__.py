"""hpcfed's numpy demo app for Flower (see pyproject.toml)."""
