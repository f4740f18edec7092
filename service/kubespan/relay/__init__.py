"""A blind relay for pairs of members that have no direct path (issue 12).

A relay member forwards the two sides' WireGuard packets to each other in the kernel, with
stateless nftables rules, and never holds a key that could open them: each side sends to one
port of the relay's, and the relay rewrites the packet to come from the other side's port
and go to the other side's NAT mapping. `forward` is the ruleset as data, `kernel` applies
it, `bind`/`bindings`/`ports` are how sides bind their ports, `server` is the relay's thread;
`choice` says which pairs want a relay and which, `client` is a side's binds.
"""
