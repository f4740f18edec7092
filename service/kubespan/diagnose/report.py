"""How `kubespan check` prints its findings: a block per finding for people, a stable JSON
list for programs."""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict

from kubespan.agent.status import printable
from kubespan.diagnose.finding import Finding

WIDTH = 100
LIMIT = 2000  # a finding's text is a few hundred characters; names in it are bounded
HEALTHY = "no problems found"


def findings_json(findings: Sequence[Finding]) -> str:
    """[{"code", "severity", "what", "why", "todo"}, ...], in the order diagnosed."""
    return json.dumps([asdict(finding) for finding in findings], indent=2)


def render_findings(findings: Sequence[Finding]) -> str:
    """One block per finding, then a summary line. Every text may carry names from the
    kernel or a discovery service: control characters are shown escaped, never sent."""
    blocks = []
    for finding in findings:
        lines = [f"{finding.severity.upper()} {printable(finding.code)}"]
        for label, text in (("what", finding.what), ("why", finding.why), ("todo", finding.todo)):
            lines += textwrap.wrap(
                printable(text, LIMIT),
                WIDTH,
                initial_indent=f"  {label + ':':6}",
                subsequent_indent=" " * 8,
                break_long_words=False,
                break_on_hyphens=False,
            )
        blocks.append("\n".join(lines))
    blocks.append(summary(findings))
    return "\n\n".join(blocks)


def summary(findings: Sequence[Finding]) -> str:
    counts = Counter(finding.severity for finding in findings)
    if not counts["error"] and not counts["warning"]:
        return HEALTHY
    parts = [
        f"{counts[severity]} {severity}{'s' if counts[severity] != 1 else ''}"
        for severity in ("error", "warning")
        if counts[severity]
    ]
    return " and ".join(parts) + " found"


def check_summary(findings: Sequence[Finding]) -> dict[str, object]:
    """What `kubespan status` shows of the check: its summary line and each finding's code
    and severity (the whole story is `kubespan check`'s)."""
    return {
        "summary": summary(findings),
        "findings": [{"code": f.code, "severity": f.severity} for f in findings],
    }


def check_line(check: Mapping[str, object]) -> str:
    """The line `kubespan status` prints for a check summary (names escaped)."""
    findings = check.get("findings")
    codes = [
        printable(str(f.get("code")))
        for f in (findings if isinstance(findings, list) else [])
        if isinstance(f, dict) and f.get("severity") in ("error", "warning")
    ]
    listed = f" ({', '.join(codes)})" if codes else ""
    more = "; details: kubespan check" if codes else ""
    return f"check: {printable(str(check.get('summary')))}{listed}{more}"
