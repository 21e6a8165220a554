"""The hub: the one machine with a public address that every tunnel dials, and its peer registry.

Fed-BioMed's registry, the commands its users know (init, genconf, add, remove, removeconf, list)
plus `up`/`down`, applied to a live WireGuard interface (kernel or wireguard-go) with `wg` and `ip`,
and persisted so `hpcfed hub up` after a reboot restores every peer.
"""
