"""STUN (RFC 8489): learning the public endpoint a NAT maps the WireGuard port to."""
