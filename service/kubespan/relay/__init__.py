"""A blind relay for pairs of members that have no direct path (issue 12).

A relay member forwards the two sides' WireGuard packets to each other in the kernel, with
nftables destination and source NAT, and never holds a key that could open them: each side
sends to one port of the relay's, and the relay rewrites the packet to come from the other
side's port and go to the other side's NAT mapping. `forward` is the nftables ruleset as
data, `kernel` applies it.
"""
