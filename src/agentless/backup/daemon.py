"""``vmbackup serve``: the scheduler as a daemon, with ``/metrics`` (Prometheus text
format) and ``/health`` over HTTP.

The metrics are read from the state database at each scrape (plus what runs now), so
they survive restarts and agree with ``vmbackup jobs``; with several workers sharing the
database, the counters are the fleet's and the running backups this worker's:

=============================================== ======= ==================================
name                                            type    labels
=============================================== ======= ==================================
``vmbackup_runs_total``                         counter policy, state
``vmbackup_vm_backups_total``                   counter policy, outcome
``vmbackup_read_bytes_total``                   counter policy
``vmbackup_stored_bytes_total``                 counter policy
``vmbackup_last_run_timestamp_seconds``         gauge   policy (when the newest run ended)
``vmbackup_last_run_duration_seconds``          gauge   policy
``vmbackup_last_run_success``                   gauge   policy (1 succeeded, 0 not)
``vmbackup_last_success_timestamp_seconds``     gauge   policy
``vmbackup_next_run_timestamp_seconds``         gauge   policy
``vmbackup_policies``                           gauge
``vmbackup_running_runs``                       gauge
``vmbackup_running_backups``                    gauge
``vmbackup_scheduler_last_tick_timestamp_seconds`` gauge
``vmbackup_worker_info``                        gauge   worker (this worker's name; 1)
``vmbackup_workers_alive``                      gauge   (workers of the fleet alive)
=============================================== ======= ==================================

``/health`` answers 200 and a JSON document while the scheduler ticks and the state
database answers, 503 (same document, ``status: "failing"`` and why) otherwise – what a
load balancer or a service manager's watchdog probes. Both are plain HTTP, on loopback
by default (as node exporters are); put a TLS proxy in front to publish them. Port 0
(``--listen 127.0.0.1:0``) picks a free port; :attr:`Daemon.address` is the one bound,
which ``vmbackup serve`` logs once it serves.

Neither takes a body: a request that announces more than :data:`MAX_BODY` bytes, or a
chunked one, is answered 413 (problem+json) unread and its connection closed, and a
connection that sends nothing for :data:`REQUEST_SECONDS` is closed.
"""

from __future__ import annotations

import datetime
import http.server
import json
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .claims import list_workers
from .scheduler import Scheduler

__all__ = ["MAX_BODY", "REQUEST_SECONDS", "Daemon"]

MAX_BODY = 4096
REQUEST_SECONDS = 10.0


class _Metrics(Collector):
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        state = self.scheduler.state
        runs = CounterMetricFamily("vmbackup_runs", "Policy runs ended, by state", labels=["policy", "state"])
        vms = CounterMetricFamily(
            "vmbackup_vm_backups", "VM backups of policy runs, by outcome", labels=["policy", "outcome"]
        )
        read = CounterMetricFamily("vmbackup_read_bytes", "Bytes read from VM disks", labels=["policy"])
        stored = CounterMetricFamily(
            "vmbackup_stored_bytes", "Bytes added to repositories", labels=["policy"]
        )
        sums: dict[str, list[int]] = {}
        for row in state.totals():
            if row["kind"] == "runs":
                if row["state"] != "running":
                    runs.add_metric([row["policy"], row["state"]], row["count"])
            else:
                vms.add_metric([row["policy"], row["outcome"]], row["count"])
                total = sums.setdefault(row["policy"], [0, 0])
                total[0] += row["read"]
                total[1] += row["stored"]
        for policy, (r, s) in sorted(sums.items()):
            read.add_metric([policy], r)
            stored.add_metric([policy], s)
        yield from (runs, vms, read, stored)

        last = GaugeMetricFamily(
            "vmbackup_last_run_timestamp_seconds", "When the newest run ended", labels=["policy"]
        )
        duration = GaugeMetricFamily(
            "vmbackup_last_run_duration_seconds", "How long the newest run took", labels=["policy"]
        )
        success = GaugeMetricFamily(
            "vmbackup_last_run_success", "1 when the newest run succeeded", labels=["policy"]
        )
        good = GaugeMetricFamily(
            "vmbackup_last_success_timestamp_seconds",
            "When the newest successful run ended",
            labels=["policy"],
        )
        for policy, seen in sorted(state.latest().items()):
            if "last" in seen:
                ended, seconds, verdict = seen["last"]
                last.add_metric([policy], ended.timestamp())
                duration.add_metric([policy], seconds)
                success.add_metric([policy], 1.0 if verdict == "succeeded" else 0.0)
            if "success" in seen:
                good.add_metric([policy], seen["success"].timestamp())
        yield from (last, duration, success, good)

        upcoming = self.scheduler.next_runs()
        following = GaugeMetricFamily(
            "vmbackup_next_run_timestamp_seconds", "When the policy is due next", labels=["policy"]
        )
        for policy, moment in sorted(upcoming.items()):
            following.add_metric([policy], moment.timestamp())
        yield following
        yield GaugeMetricFamily("vmbackup_policies", "Policies defined", value=len(upcoming))
        yield GaugeMetricFamily(
            "vmbackup_running_runs", "Policy runs in progress", value=len(self.scheduler.running_runs)
        )
        yield GaugeMetricFamily(
            "vmbackup_running_backups", "VM backups in progress", value=self.scheduler.runner.running_backups
        )
        worker = GaugeMetricFamily("vmbackup_worker_info", "This worker of the fleet", labels=["worker"])
        worker.add_metric([self.scheduler.runner.name], 1.0)
        yield worker
        yield GaugeMetricFamily(
            "vmbackup_workers_alive", "Workers of the fleet alive (this one included)", value=self._alive()
        )
        tick = self.scheduler.last_tick
        yield GaugeMetricFamily(
            "vmbackup_scheduler_last_tick_timestamp_seconds",
            "When the scheduler last looked for due runs",
            value=tick.timestamp() if tick else 0.0,
        )

    def _alive(self) -> int:
        return sum(1 for worker in list_workers(self.scheduler.state) if worker.state == "alive")


class Daemon:
    """The scheduler loop in a thread and the HTTP endpoints; a context manager.
    :meth:`wait` blocks until SIGTERM/SIGINT (or :meth:`stop`)."""

    def __init__(self, scheduler: Scheduler, host: str = "127.0.0.1", port: int = 9478):
        self.scheduler = scheduler
        self.stopping = threading.Event()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Metrics(scheduler))
        self._loop = threading.Thread(
            target=scheduler.serve_forever, args=(self.stopping,), name="scheduler", daemon=True
        )
        self.http = http.server.ThreadingHTTPServer((host, port), _handler(self))
        self.http.daemon_threads = True
        self._http_thread = threading.Thread(target=self.http.serve_forever, name="http", daemon=True)
        self._previous: dict[int, Any] = {}  # signal handlers replaced while entered

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.http.server_address[:2]
        return str(host), int(port)

    def __enter__(self) -> Daemon:
        # SIGTERM/SIGINT stop the daemon from the moment it serves, not only once the
        # caller reaches wait(): a run may start at the first tick, and a signal while the
        # caller still logs its start must end it as cleanly (found by the fault
        # campaign's kill -9 matrix: `vmbackup serve` stopped just after a start exited -15)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, lambda *_: self.stopping.set())
        self._http_thread.start()
        self._loop.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
        self._loop.join(90.0)
        self.http.shutdown()
        self.http.server_close()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def stop(self) -> None:
        self.stopping.set()

    def wait(self) -> bool:
        """Until a signal (SIGTERM, SIGINT: caught from :meth:`__enter__` on, when entered
        in the main thread) or :meth:`stop`; False when the scheduler loop ended by itself
        (a bug: the log says what)."""
        while not self.stopping.wait(1.0):
            if not self._loop.is_alive():
                return False
        return True

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, document) of ``/health``."""
        problems = []
        if not self._loop.is_alive() and not self.stopping.is_set():
            problems.append("the scheduler loop has ended")
        tick = self.scheduler.last_tick
        now = self.scheduler.clock.now()
        late = datetime.timedelta(seconds=3 * self.scheduler.interval + 60)
        if tick is None or now - tick > late:
            problems.append("the scheduler has not ticked lately")
        try:
            policies = len(self.scheduler.state.policies())
        except Exception as error:
            policies = -1
            problems.append(f"state database: {error}")
        if self.stopping.is_set():
            problems.append("stopping")
        document = {
            "status": "failing" if problems else "ok",
            "worker": self.scheduler.runner.name,
            "problems": problems,
            "policies": policies,
            "running": self.scheduler.running_runs,
            "last_tick": tick.isoformat() if tick else None,
        }
        return (503 if problems else 200), document


def _handler(daemon: Daemon) -> Callable[..., http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "vmbackup"
        timeout = REQUEST_SECONDS

        def parse_request(self) -> bool:
            """The request line and headers; False (answered) for a body over the cap."""
            if not super().parse_request():
                return False
            length = self.headers.get("Content-Length", "0").strip()
            if "Transfer-Encoding" in self.headers or not length.isdigit() or int(length) > MAX_BODY:
                detail = f"/metrics and /health take no body (at most {MAX_BODY} bytes, not chunked)"
                body = json.dumps(
                    {"type": "about:blank", "title": "Content Too Large", "status": 413, "detail": detail}
                ).encode()
                self.close_connection = True
                self.send_response(413)
                self.send_header("Content-Type", "application/problem+json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                return False
            return True

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body, status, kind = generate_latest(daemon.registry), 200, CONTENT_TYPE_LATEST
                except Exception as error:  # the state database is down: say so, do not die
                    body, status, kind = f"metrics unavailable: {error}\n".encode(), 503, "text/plain"
            elif path == "/health":
                status, document = daemon.health()
                body, kind = json.dumps(document).encode() + b"\n", "application/json"
            else:
                body, status, kind = b"not found: /metrics and /health are served\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s: not logged
            pass

    return Handler
