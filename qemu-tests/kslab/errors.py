"""Errors raised by the harness. Every one carries enough context to act on."""


class LabError(Exception):
    """A lab resource (namespace, process, VM) could not be set up or driven."""
