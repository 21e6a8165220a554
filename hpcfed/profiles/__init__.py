"""Site profiles: how to reach a cluster and what to ask its scheduler for (see docs/site-profiles.md)."""

from hpcfed.profiles.loader import LoadedSite, load_site, site_names

__all__ = ["LoadedSite", "load_site", "site_names"]
