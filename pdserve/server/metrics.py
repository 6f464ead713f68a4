"""Prometheus metrics of one server, named as SGLang's so existing dashboards work.

Per-rank gauges are refreshed from the load every worker reports with its outputs; latency
histograms and token counters are fed by the controller as outputs arrive. Each server owns its
own registry (several apps can live in one process, e.g. in tests). A P/D server adds the KV
transfer counters its ranks report (:class:`DisaggCollector`).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdserve.disagg.stats import LATENCY_BUCKETS_S, DisaggReport, Refusals
from pdserve.http_common import HTTP_REFUSALS
from pdserve.server.messages import RankLoad

LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
ITL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class ServerMetrics:
    """All metrics of one server; ``model_name`` labels everything."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str = "", page_size: int = 16, hash_algo: str = "sha256",
                 prefix_cache: bool = True) -> None:
        self.model_name = model_name
        self.page_size = page_size
        self.hash_algo = hash_algo
        self.prefix_cache = prefix_cache
        self.loads: dict[int, RankLoad] = {}  # latest load of each rank, for the vLLM-named gauges
        self.kv_publisher = None  # the ZMQ KV-event publisher, when the server has one
        self.registry = CollectorRegistry(auto_describe=True)
        rank_labels = ["model_name", "dp_rank"]
        self.running = Gauge(
            "sglang:num_running_reqs", "Requests running on the rank", rank_labels, registry=self.registry
        )
        self.waiting = Gauge(
            "sglang:num_queue_reqs", "Requests waiting in the rank's queue", rank_labels, registry=self.registry
        )
        self.used_tokens = Gauge(
            "sglang:num_used_tokens", "Tokens held by running requests", rank_labels, registry=self.registry
        )
        self.token_usage = Gauge(
            "sglang:token_usage", "Share of the rank's KV pages in use", rank_labels, registry=self.registry
        )
        self.used_pages = Gauge(
            "pdserve:kv_used_pages", "KV pages in use on the rank", rank_labels, registry=self.registry
        )
        self.total_pages = Gauge(
            "pdserve:kv_total_pages", "KV pages of the rank", rank_labels, registry=self.registry
        )
        self.retractions = Gauge(
            "pdserve:num_retractions", "Requests retracted (KV dropped for recompute) since the rank started",
            rank_labels, registry=self.registry,
        )
        self.preemptions = Gauge(
            "pdserve:num_preemptions", "Retractions made for a request that had waited longer after its first token",
            rank_labels, registry=self.registry,
        )
        self.stall_timeouts = Gauge(
            "pdserve:num_stall_timeouts", "Requests failed for not running again within --stall-timeout",
            rank_labels, registry=self.registry,
        )
        self.steps = Gauge(
            "pdserve:engine_steps", "Engine steps since the rank started", rank_labels, registry=self.registry
        )
        self.cached_pages = Gauge(
            "pdserve:prefix_cache_pages", "KV pages the prefix cache holds", rank_labels, registry=self.registry
        )
        self.cache_hit_rate = Gauge(
            "sglang:cache_hit_rate", "Share of admitted prompt tokens read from the prefix cache", rank_labels,
            registry=self.registry,
        )
        self.cached_tokens = Gauge(
            "pdserve:prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache since start", rank_labels,
            registry=self.registry,
        )
        self.prefill_computed = Gauge(
            "pdserve:prefill_tokens_computed", "Tokens run through prefill since start (recomputation included)",
            rank_labels, registry=self.registry,
        )
        self.ttft = Histogram(
            "sglang:time_to_first_token_seconds", "Arrival to first output token", ["model_name"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.itl = Histogram(
            "sglang:inter_token_latency_seconds", "Gap between consecutive output tokens", ["model_name"],
            buckets=ITL_BUCKETS, registry=self.registry,
        )
        self.e2e = Histogram(
            "sglang:e2e_request_latency_seconds", "Arrival to finish", ["model_name"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "sglang:prompt_tokens", "Prompt tokens of finished requests", ["model_name"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "sglang:generation_tokens", "Generated tokens", ["model_name"], registry=self.registry
        )
        self.requests = Counter(
            "sglang:num_requests", "Finished requests", ["model_name"], registry=self.registry
        )
        self.decode_local_prefills = Counter(
            "pdserve:decode_local_prefills", "Decode-mode requests with no KV source whose prompt this server computed "
            "itself (--disaggregation-decode-allow-local-prefill; without it they are refused with 400)",
            ["model_name"], registry=self.registry,
        )
        self.refusals = Refusals()  # the front's own listeners (bootstrap service)
        self.disagg = DisaggCollector(self)
        self.registry.register(self.disagg)
        self.registry.register(VllmNamesCollector(self))
        self.registry.register(KVEventsCollector(self))

    def set_model_name(self, name: str) -> None:
        """Relabel from now on (the name is known only once the workers report the model)."""
        if name == self.model_name:
            return
        self.model_name = name
        for gauge in self._rank_gauges():
            gauge.clear()

    def _rank_gauges(self) -> tuple[Gauge, ...]:
        return (self.running, self.waiting, self.used_tokens, self.token_usage, self.used_pages, self.total_pages,
                self.cached_pages, self.cache_hit_rate, self.cached_tokens, self.prefill_computed, self.retractions,
                self.preemptions, self.stall_timeouts, self.steps)

    def set_load(self, rank: int, load: RankLoad) -> None:
        self.loads[rank] = load
        labels = (self.model_name, str(rank))
        self.running.labels(*labels).set(load.num_reqs - load.num_waiting_reqs)
        self.waiting.labels(*labels).set(load.num_waiting_reqs)
        self.used_tokens.labels(*labels).set(load.num_tokens)
        self.used_pages.labels(*labels).set(load.num_used_pages)
        self.total_pages.labels(*labels).set(load.num_total_pages)
        self.token_usage.labels(*labels).set(load.num_used_pages / max(1, load.num_total_pages))
        self.retractions.labels(*labels).set(load.num_retractions)
        self.preemptions.labels(*labels).set(load.num_preemptions)
        self.stall_timeouts.labels(*labels).set(load.num_stall_timeouts)
        self.steps.labels(*labels).set(load.num_steps)
        self.cached_pages.labels(*labels).set(load.num_cached_pages)
        self.cache_hit_rate.labels(*labels).set(load.cache_hit_rate)
        self.cached_tokens.labels(*labels).set(load.cached_tokens_total)
        self.prefill_computed.labels(*labels).set(load.prefill_tokens_computed)

    def on_tokens(self, num_new: int, first: bool, arrival: float, last_token_at: float | None, now: float) -> None:
        """New output tokens of one request: TTFT for the first, otherwise one ITL sample per token."""
        if num_new <= 0:
            return
        self.generation_tokens.labels(self.model_name).inc(num_new)
        if first:
            self.ttft.labels(self.model_name).observe(now - arrival)
        elif last_token_at is not None:
            gap = (now - last_token_at) / num_new
            for _ in range(num_new):
                self.itl.labels(self.model_name).observe(gap)

    def on_finish(self, prompt_tokens: int, arrival: float, now: float) -> None:
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.e2e.labels(self.model_name).observe(now - arrival)
        self.requests.labels(self.model_name).inc()

    def set_disagg(self, rank: int, report: DisaggReport) -> None:
        self.disagg.reports[rank] = report

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DisaggCollector:
    """P/D metrics rebuilt at each scrape from the latest report of every rank."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.reports: dict[int, DisaggReport] = {}

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "dp_rank", "role"]
        moved = CounterMetricFamily("pdserve:kv_transfer_bytes", "KV cache bytes moved between prefill and decode",
                                    labels=labels)
        count = CounterMetricFamily("pdserve:kv_transfers", "Completed KV transfers", labels=labels)
        latency = HistogramMetricFamily("pdserve:kv_transfer_latency_seconds",
                                        "First KV page sent/received to transfer complete", labels=labels)
        failures = CounterMetricFamily("pdserve:kv_transfer_failures", "Failed P/D rooms by cause",
                                       labels=[*labels, "cause"])
        refusals = CounterMetricFamily("pdserve:refusals", "Connections and messages refused at an auth check or a cap",
                                       labels=["model_name", "where", "listener", "reason"])
        for key, n in sorted(self.metrics.refusals.snapshot().items()):
            refusals.add_metric([self.metrics.model_name, "front", *key.split(":", 1)], n)
        for reason, n in sorted(HTTP_REFUSALS.items()):
            refusals.add_metric([self.metrics.model_name, "front", "http", reason], n)
        rooms = GaugeMetricFamily("pdserve:disagg_rooms", "P/D rooms in flight by what they wait for",
                                  labels=[*labels, "state"])
        for rank, report in sorted(self.reports.items()):
            values = [self.metrics.model_name, str(rank), report.role]
            moved.add_metric(values, report.transfer_bytes)
            count.add_metric(values, report.transfers)
            buckets, total = [], 0
            for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), report.latency_counts):
                total += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
            latency.add_metric(values, buckets, report.latency_sum_s)
            for cause, n in sorted(report.failures.items()):
                failures.add_metric([*values, cause], n)
            for state, n in sorted(report.rooms.items()):
                rooms.add_metric([*values, state], n)
            for key, n in sorted(report.refusals.items()):
                refusals.add_metric([self.metrics.model_name, f"dp_rank {rank}", *key.split(":", 1)], n)
        yield from (moved, count, latency, failures, rooms, refusals)


class VllmNamesCollector:
    """The gauges the Gateway API Inference Extension's endpoint picker (and llm-d) read from a vLLM
    server, with vLLM's labels (``engine`` is the DP rank), from the same loads as ``/get_load``
    (vllm-router's ``--intra-node-data-parallel-size`` counts a server's DP ranks by these ``engine`` labels):
    ``vllm:num_requests_waiting`` (queued), ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``
    (a fraction, as vLLM's: pages held by requests / pages of the rank) and the info gauge
    ``vllm:cache_config_info`` (``block_size``, ``num_gpu_blocks``: the page size and page count).
    Their SGLang names (``sglang:num_queue_reqs``, ``sglang:num_running_reqs``, ``sglang:token_usage``)
    are :class:`ServerMetrics`' own."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        labels = ["model_name", "engine"]
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to be scheduled", labels=labels)
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch", labels=labels)
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent", labels=labels)
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the KV cache config",
            labels=["engine", "block_size", "num_gpu_blocks", "enable_prefix_caching", "prefix_caching_hash_algo",
                    "cache_dtype"])
        for rank, load in sorted(m.loads.items()):
            values = [m.model_name, str(rank)]
            waiting.add_metric(values, load.num_waiting_reqs)
            running.add_metric(values, load.num_reqs - load.num_waiting_reqs)
            usage.add_metric(values, load.num_used_pages / max(1, load.num_total_pages))
            info.add_metric([str(rank), str(m.page_size), str(load.num_total_pages), str(m.prefix_cache),
                             m.hash_algo, "auto"], 1.0)
        yield from (waiting, running, usage, info)


class KVEventsCollector:
    """Counters of the ZMQ KV-event publisher (absent without ``--kv-events-config``)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        publisher = self.metrics.kv_publisher
        if publisher is None:
            return
        c = publisher.counters()
        name = [self.metrics.model_name]
        published = CounterMetricFamily("pdserve:kv_events_published", "KV event batches sent on the ZMQ PUB socket",
                                        labels=["model_name", "dp_rank"])
        for rank, n in enumerate(c["published"]):
            published.add_metric([*name, str(rank)], n)
        dropped = CounterMetricFamily(
            "pdserve:kv_events_dropped", "KV event batches dropped oldest-first: the publisher queue was full "
            "(--kv-events-config max_queue_size)", labels=["model_name"])
        dropped.add_metric(name, c["dropped"])
        unmapped = CounterMetricFamily("pdserve:kv_events_unmapped",
                                       "Events naming a page whose vLLM hash is unknown (not sent)", labels=["model_name"])
        unmapped.add_metric(name, c["unmapped"])
        depth = GaugeMetricFamily("pdserve:kv_events_queue_depth", "KV event batches waiting for the publisher thread",
                                  labels=["model_name"])
        depth.add_metric(name, c["queue_depth"])
        replays = CounterMetricFamily("pdserve:kv_events_replays", "Replay requests answered or refused",
                                      labels=["model_name", "outcome"])
        replays.add_metric([*name, "served"], c["replays_served"])
        for reason, n in sorted(c["replays_refused"].items()):
            replays.add_metric([*name, reason], n)
        yield from (published, dropped, unmapped, depth, replays)
