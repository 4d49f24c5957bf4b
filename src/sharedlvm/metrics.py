"""Daemon metrics in the Prometheus text format.

The daemon keeps counters in a :class:`Metrics` object, writes them every
``interval`` seconds to ``<state dir>/metrics.prom`` (atomically, for node_exporter's
textfile collector: no listener needed on a storage host) and answers them over its
socket (``sharedlvm metrics``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

PREFIX = "sharedlvm"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (op, outcome)
        self.seconds: dict[str, float] = defaultdict(float)
        self.mailbox_requests_served = 0

    def observe(self, op: str, ok: bool, seconds: float) -> None:
        with self._lock:
            self.requests[(op, "ok" if ok else "error")] += 1
            self.seconds[op] += seconds

    def render(self, gauges: Iterable[tuple[str, str, dict[str, str], float]]) -> str:
        """The text format: counters kept here, plus ``gauges`` sampled by the caller
        as (name, help, labels, value)."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {PREFIX}_{name} {help_text}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")

        with self._lock:
            family("requests_total", "counter", "Requests handled by this daemon.")
            for (op, outcome), count in sorted(self.requests.items()):
                lines.append(f'{PREFIX}_requests_total{{op="{op}",outcome="{outcome}"}} {count}')
            family("request_seconds_total", "counter", "Time spent on requests, by op.")
            for op, seconds in sorted(self.seconds.items()):
                lines.append(f'{PREFIX}_request_seconds_total{{op="{op}"}} {seconds:.6f}')
            family("mailbox_requests_served_total", "counter",
                   "Requests from other hosts served through the storage mailbox.")
            lines.append(f"{PREFIX}_mailbox_requests_served_total "
                         f"{self.mailbox_requests_served}")
        seen: set[str] = set()
        for name, help_text, labels, value in gauges:
            if name not in seen:
                family(name, "counter" if name.endswith("_total") else "gauge", help_text)
                seen.add(name)
            text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            lines.append(f"{PREFIX}_{name}{{{text}}} {value:g}")
        return "\n".join(lines) + "\n"


def write_textfile(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_writer(stop: threading.Event, path: Path, render: Callable[[], str],
               interval: float = 10.0) -> None:
    while not stop.wait(interval):
        with contextlib.suppress(OSError):  # a full /var must not stop the daemon
            write_textfile(path, render())
