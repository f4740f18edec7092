"""The service's metrics in the Prometheus text format. Counters only count; gauges are read
from the state when scraped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

from kubespan.discovery.http import TransportCounters

PREFIX = "kubespan_discovery"


class StunCounters:
    """The STUN reflector's datagrams: all of them, those answered, those refused by reason."""

    def __init__(self) -> None:
        self.requests = 0
        self.answered = 0
        self.refused: Counter[str] = Counter()


class Metrics:
    def __init__(self) -> None:
        self.stun = StunCounters()
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.rejected: Counter[str] = Counter()
        self.notifications = 0
        self.snapshot_failures = 0
        self.snapshot_seconds = 0.0
        self.errors = 0  # periodic tasks that failed

    def request(self, method: str, route: str, status: int) -> None:
        self.requests[(method, route, status)] += 1

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def render(
        self,
        gauges: Mapping[str, Callable[[], float]],
        transports: Mapping[str, TransportCounters],
    ) -> str:
        lines = [
            f"# HELP {PREFIX}_requests_total Requests answered, by method, route and status.",
            f"# TYPE {PREFIX}_requests_total counter",
        ]
        for (method, route, status), count in sorted(self.requests.items()):
            # The method is whatever the client sent (the parser accepts only known tokens).
            lines.append(
                f'{PREFIX}_requests_total{{method="{method}",route="{route}",'
                f'code="{status}"}} {count}'
            )
        lines += [
            f"# HELP {PREFIX}_rejected_total Requests refused before any state was touched.",
            f"# TYPE {PREFIX}_rejected_total counter",
        ]
        for reason, count in sorted(self.rejected.items()):
            lines.append(f'{PREFIX}_rejected_total{{reason="{reason}"}} {count}')
        lines += [
            f"# HELP {PREFIX}_connections_refused_total Connections refused, evicted or cut "
            "short by the transport.",
            f"# TYPE {PREFIX}_connections_refused_total counter",
        ]
        for listener, counters in sorted(transports.items()):
            for reason, count in sorted(counters.refused.items()):
                lines.append(
                    f'{PREFIX}_connections_refused_total{{listener="{listener}",'
                    f'reason="{reason}"}} {count}'
                )
        lines += [
            f"# HELP {PREFIX}_stun_requests_total Datagrams received by the STUN reflector.",
            f"# TYPE {PREFIX}_stun_requests_total counter",
            f"{PREFIX}_stun_requests_total {self.stun.requests}",
            f"# HELP {PREFIX}_stun_answers_total Binding requests answered.",
            f"# TYPE {PREFIX}_stun_answers_total counter",
            f"{PREFIX}_stun_answers_total {self.stun.answered}",
            f"# HELP {PREFIX}_stun_refused_total Datagrams dropped unanswered, by reason.",
            f"# TYPE {PREFIX}_stun_refused_total counter",
        ]
        for reason, count in sorted(self.stun.refused.items()):
            lines.append(f'{PREFIX}_stun_refused_total{{reason="{reason}"}} {count}')
        internal = sum(c.errors for c in transports.values()) + self.errors
        lines += [
            f"# HELP {PREFIX}_internal_errors_total Handler or timer exceptions (answered 500).",
            f"# TYPE {PREFIX}_internal_errors_total counter",
            f"{PREFIX}_internal_errors_total {internal}",
            f"# HELP {PREFIX}_notifications_total Long polls woken by a change.",
            f"# TYPE {PREFIX}_notifications_total counter",
            f"{PREFIX}_notifications_total {self.notifications}",
            f"# HELP {PREFIX}_snapshot_failures_total Snapshots that could not be written.",
            f"# TYPE {PREFIX}_snapshot_failures_total counter",
            f"{PREFIX}_snapshot_failures_total {self.snapshot_failures}",
            f"# TYPE {PREFIX}_snapshot_seconds gauge",
            f"{PREFIX}_snapshot_seconds {self.snapshot_seconds:.3f}",
        ]
        for name, read in sorted(gauges.items()):
            lines += [f"# TYPE {PREFIX}_{name} gauge", f"{PREFIX}_{name} {read():g}"]
        return "\n".join(lines) + "\n"
