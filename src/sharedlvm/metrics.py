"""Daemon metrics in the Prometheus text format.

The daemon keeps counters and latency histograms in a :class:`Metrics` object,
writes them every ``interval`` seconds to ``<state dir>/metrics.prom`` (atomically, for
node_exporter's textfile collector: no listener needed on a storage host) and
answers them over its socket (``sharedlvm metrics``) and the HTTP API (``/metrics``).

Request latencies are histograms (``sharedlvm_request_duration_seconds``), so p50
and p99 can be read from the metrics with ``histogram_quantile``. The buckets span
what a request costs: a lease acquire (ms), an LVM commit (tens to hundreds of ms),
a request forwarded through the mailbox to an idle manager (up to one 2 s sweep), a
wipe (seconds to minutes).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

PREFIX = "sharedlvm"

BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                              30.0, 60.0, 300.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # cumulative: observations <= bucket
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (op, outcome)
        self.durations: dict[str, Histogram] = {}

    def observe(self, op: str, ok: bool, seconds: float) -> None:
        with self._lock:
            self.requests[(op, "ok" if ok else "error")] += 1
            self.durations.setdefault(op, Histogram()).observe(seconds)

    def render(self, gauges: Iterable[tuple[str, str, dict[str, str], float]]) -> str:
        """The text format: counters and histograms kept here, plus ``gauges`` sampled
        by the caller as (name, help, labels, value)."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {PREFIX}_{name} {help_text}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")

        with self._lock:
            family("requests_total", "counter", "Requests handled by this daemon.")
            for (op, outcome), count in sorted(self.requests.items()):
                lines.append(f'{PREFIX}_requests_total{{op="{op}",outcome="{outcome}"}} {count}')
            family("request_duration_seconds", "histogram",
                   "Time to answer a request, by operation.")
            name = f"{PREFIX}_request_duration_seconds"
            for op, hist in sorted(self.durations.items()):
                for bound, count in zip(hist.buckets, hist.counts, strict=True):
                    lines.append(f'{name}_bucket{{op="{op}",le="{bound:g}"}} {count}')
                lines.append(f'{name}_bucket{{op="{op}",le="+Inf"}} {hist.count}')
                lines.append(f'{name}_sum{{op="{op}"}} {hist.sum:.6f}')
                lines.append(f'{name}_count{{op="{op}"}} {hist.count}')
        seen: set[str] = set()
        # Samples of one family must be contiguous (several domains: group by name).
        for gauge, help_text, labels, value in sorted(gauges, key=lambda g: g[0]):
            if gauge not in seen:
                family(gauge, "counter" if gauge.endswith("_total") else "gauge", help_text)
                seen.add(gauge)
            text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            lines.append(f"{PREFIX}_{gauge}{{{text}}} {value:g}")
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
