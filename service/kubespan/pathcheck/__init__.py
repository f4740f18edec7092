"""Authenticated path checks between members WireGuard ports."""
