"""The node agent: the reconcile loop and the threads that feed it."""
