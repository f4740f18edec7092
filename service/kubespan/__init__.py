"""kubespan: join machines on any network into one encrypted cluster over kernel WireGuard."""

__version__ = "0.1.0"
