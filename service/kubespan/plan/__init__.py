"""The pure core: from config, identity, members and observed state to the desired state.

Nothing in this package opens a socket, reads a clock or draws a random number; time and
observations come in as arguments.
"""
