"""Prometheus metrics of one server, in a registry of their own, served on their own port.

A registry per server (not the global default) keeps several servers in one process
(tests, the demo) from colliding, and keeps Python process metrics out of the way.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
OUTCOMES = ("ok", "cancelled", "deadline_exceeded", "invalid_argument", "not_found",
            "resource_exhausted", "unavailable", "error")


class Metrics:
    """Every metric the server exports."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("coserve_requests", "Generate requests by outcome",
                                ["outcome"], registry=r)
        for outcome in OUTCOMES:  # export zeros, so rates work before the first event
            self.requests.labels(outcome)
        self.queue_length = Gauge("coserve_queue_length",
                                  "Admitted requests that have no token yet", registry=r)
        self.running = Gauge("coserve_running_requests",
                             "Requests that are producing tokens", registry=r)
        self.streams = Gauge("coserve_open_streams", "Open Generate streams", registry=r)
        self.kv_pages_used = Gauge("coserve_kv_pages_used", "KV cache pages in use", registry=r)
        self.kv_pages_total = Gauge("coserve_kv_pages_total", "KV cache pages", registry=r)
        self.kv_usage = Gauge("coserve_kv_usage_ratio", "Fraction of KV pages in use",
                              registry=r)
        self.ttft = Histogram("coserve_ttft_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("coserve_tpot_seconds", "Mean time per output token after "
                              "the first, per request", registry=r, buckets=TPOT_BUCKETS)
        self.e2e = Histogram("coserve_e2e_seconds", "Arrival to last token", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.slo = Counter("coserve_slo_requests", "Finished requests with SLO targets, by "
                           "whether they met them", ["attained"], registry=r)
        self.slo.labels("true")
        self.slo.labels("false")
        self.slo_attainment = Gauge("coserve_slo_attainment_ratio", "Share of finished "
                                    "requests with targets that met them", registry=r)
        self.step_time = Histogram("coserve_step_seconds", "Engine iteration time", registry=r,
                                   buckets=TPOT_BUCKETS)
        self.job_tokens_per_s = Gauge("coserve_finetune_tokens_per_second",
                                      "Finetuning tokens per second of a job",
                                      ["tenant", "job"], registry=r)
        self.job_loss = Gauge("coserve_finetune_loss", "Loss of a job's last optimizer step",
                              ["tenant", "job"], registry=r)
        self.job_step = Gauge("coserve_finetune_step", "Optimizer steps a job has taken",
                              ["tenant", "job"], registry=r)
        self.jobs_running = Gauge("coserve_finetune_jobs_running", "Running finetuning jobs",
                                  registry=r)
        self.healthy = Gauge("coserve_serving", "1 while the server serves, 0 once it "
                             "drains or the device failed", registry=r)
        self._slo_met = 0
        self._slo_total = 0
        self._http = None

    def record_slo(self, attained: bool) -> None:
        self.slo.labels("true" if attained else "false").inc()
        self._slo_total += 1
        self._slo_met += bool(attained)
        self.slo_attainment.set(self._slo_met / self._slo_total)

    def set_kv(self, used: int, total: int) -> None:
        self.kv_pages_used.set(used)
        self.kv_pages_total.set(total)
        self.kv_usage.set(used / total if total else 0.0)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the HTTP endpoint; returns its port (``port=0`` picks a free one)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None

            def stop() -> None:  # shutdown() waits out serve_forever's 0.5 s poll
                http.shutdown()
                http.server_close()

            threading.Thread(target=stop, daemon=True).start()
