"""`kubespan check`: self-diagnosis of what users otherwise debug by hand.

facts.py holds what is observed, observe.py (the only part that reads the kernel and the
agent's status) gathers it, findings.py judges it (pure; conflicts.py: other programs'
rules, routes and marks), finding.py is what comes out, report.py prints it. Parsers of what
is read, pure as well: netlinkread.py (rules, route lookups, links), nftmarks.py (nftables
JSON), statusread.py (the agent's status document).
"""

from __future__ import annotations

from kubespan.diagnose.facts import Facts
from kubespan.diagnose.finding import Finding
from kubespan.diagnose.findings import diagnose

__all__ = ["Facts", "Finding", "diagnose"]
