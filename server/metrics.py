"""Prometheus metrics (prometheus-client), one registry per app so several apps can live in one process.

Requests by route and status, latency, rows per decoding step, queue depth, running and waiting rows, tokens
generated, time to the first streamed token, the serving loop's time by phase, requests per task (labels bounded:
the first `max_task_labels` task names, the rest counted as "other"), adapter cache counters, and adaptation jobs
by state (the gauges are read at scrape time).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .adapt.states import JOB_STATES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, max_task_labels: int = 100):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mhr_requests_total", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram("mhr_request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.batch_rows = Histogram("mhr_batch_rows", "rows per decoding step of the serving loop",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.tokens = Counter("mhr_generated_tokens_total", "tokens generated", registry=r)
        self.first_token = Histogram("mhr_time_to_first_token_seconds", "streamed requests: time to the first text",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.task_requests = Counter("mhr_task_requests_total", "requests per task", ["task"], registry=r)
        self._queue_depth = Gauge("mhr_queue_depth", "requests queued or running", registry=r)
        self._plan_items = Gauge("mhr_memory_plan_bytes", "the start-up memory plan's items", ["item", "on"],
                                 registry=r)
        self._plan_budget = Gauge("mhr_memory_budget_bytes", "memory the plan may use", registry=r)
        self._plan_held = Gauge("mhr_memory_held_at_start_bytes", "memory in use when the plan was made (the "
                                "weights included)", registry=r)
        self._task_labels: set[str] = set()
        self._max_task_labels = max_task_labels

    def count_task(self, task: str) -> None:
        if task not in self._task_labels and len(self._task_labels) < self._max_task_labels:
            self._task_labels.add(task)
        self.task_requests.labels(task if task in self._task_labels else "other").inc()

    def watch(self, queue_depth: Callable[[], int], loop_stats: Callable, cache_stats: Callable,
              job_states: Callable[[], list[str]]):
        """Values read when Prometheus scrapes: queue depth, the loop's rows, cache counters, jobs by state."""
        self._queue_depth.set_function(queue_depth)
        self.registry.register(_StateCollector(loop_stats, cache_stats, job_states))

    def show_memory_plan(self, plan) -> None:
        """The start-up memory plan as gauges: each item's bytes (on or off), the budget and what was held."""
        for item in plan.items:
            self._plan_items.labels(item.name, str(item.on).lower()).set(item.bytes)
        self._plan_budget.set(plan.budget_bytes)
        self._plan_held.set(plan.figures.held_bytes)

    async def count_streamed(self, pieces: AsyncIterator) -> AsyncIterator:
        """Pass a stream of (row, text, completions) through, timing its first text and counting its tokens."""
        start, first = time.perf_counter(), True
        async for index, text, completions in pieces:
            if first and text:
                self.first_token.observe(time.perf_counter() - start)
                first = False
            if completions is not None:
                self.tokens.inc(sum(c.completion_tokens for c in completions))
            yield index, text, completions


class _StateCollector:
    def __init__(self, loop_stats: Callable, cache_stats: Callable, job_states: Callable[[], list[str]]):
        self.loop_stats = loop_stats
        self.cache_stats = cache_stats
        self.job_states = job_states

    def collect(self):
        loop = self.loop_stats()
        yield GaugeMetricFamily("mhr_running_rows", "rows decoding in the serving loop", value=loop.running_rows)
        yield GaugeMetricFamily("mhr_waiting_rows", "rows waiting to join the serving loop", value=loop.waiting_rows)
        yield GaugeMetricFamily("mhr_kv_blocks_total", "blocks of the KV pool", value=loop.kv_blocks_total)
        yield GaugeMetricFamily("mhr_kv_blocks_free", "free blocks of the KV pool", value=loop.kv_blocks_free)
        yield GaugeMetricFamily("mhr_kv_blocks_cached", "unused KV blocks kept for the prefix cache",
                                value=loop.kv_blocks_cached)
        if loop.static_step is not None:  # a static-shaped step is configured (CUDA graphs by default on CUDA)
            yield GaugeMetricFamily("mhr_cuda_graphs_active", "1 while decoding steps replay CUDA graphs, 0 once they "
                                    "were turned off (a capture failed or differed: the log says why)",
                                    value=int(loop.static_step == "cuda-graphs"))
        for name, help_text, value in (
            ("preempted_rows", "rows preempted when the KV pool ran out (computed again)", loop.preempted_rows),
            ("prefix_cache_hit_blocks", "prompt blocks taken from the prefix cache", loop.prefix_cache_hits),
            ("encoder_cache_hits", "seq2seq rows whose encoder output came from the cache", loop.encoder_cache_hits),
            ("static_steps", "decoding steps of the static-shaped step (MHR_CUDA_GRAPHS)", loop.static_steps),
            ("cuda_graph_captures", "CUDA graphs captured by the static-shaped step", loop.graph_captures),
            ("joining_prefills", "prefill forwards of rows joining the batch (MHR_GATHER_JOINS makes them fewer)",
             loop.joining_prefills),
            ("joined_rows", "rows that joined the batch through those prefills", loop.joined_rows),
        ):
            yield CounterMetricFamily(f"mhr_{name}", help_text, value=value)
        phases = CounterMetricFamily("mhr_loop_seconds", "the serving loop's time by phase (idle, plan, other, "
                                     "prefill, decode, answer: server/engine/loop_clock.py)", labels=["phase"])
        for phase, seconds in loop.loop_seconds.items():
            phases.add_metric([phase], seconds)
        yield phases
        stats = self.cache_stats()
        for name, value in (("hits", stats.hits), ("misses", stats.misses), ("evictions", stats.evictions)):
            yield CounterMetricFamily(f"mhr_adapter_cache_{name}", f"adapter cache {name}", value=value)
        yield GaugeMetricFamily("mhr_adapter_cache_bytes", "bytes held by the adapter cache", value=stats.bytes)
        yield GaugeMetricFamily("mhr_adapter_cache_entries", "adapters in the cache", value=stats.entries)
        jobs = GaugeMetricFamily("mhr_adapt_jobs", "adaptation jobs by state", labels=["state"])
        states = self.job_states()
        for state in JOB_STATES:
            jobs.add_metric([state], states.count(state))
        yield jobs


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not the raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(label, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
