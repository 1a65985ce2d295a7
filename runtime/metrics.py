"""The server's ``GET /metrics``: Prometheus text exposition (format 0.0.4, ``prometheus_client``).

llama-server's names (``llamacpp:*``, its ``--metrics`` endpoint) where the quantity is the same, so its
dashboards work unchanged, and this server's own under ``medgemma_gguf_*``:

| metric | type | meaning |
|---|---|---|
| ``llamacpp:prompt_tokens_total`` | counter | prompt positions evaluated (images count their positions) |
| ``llamacpp:prompt_tokens_cached_total`` | counter | prompt positions re-used from a slot's cache |
| ``llamacpp:prompt_seconds_total`` | counter | time from a request's slot to its first token, summed |
| ``llamacpp:tokens_predicted_total`` | counter | generated tokens |
| ``llamacpp:tokens_predicted_seconds_total`` | counter | time from first to last token, summed over requests |
| ``llamacpp:n_decode_total`` | counter | ``llama_decode`` batches |
| ``llamacpp:prompt_tokens_seconds`` | gauge | prompt tokens/s (totals' ratio) |
| ``llamacpp:predicted_tokens_seconds`` | gauge | generated tokens/s per request (totals' ratio) |
| ``llamacpp:requests_processing`` | gauge | requests in slots |
| ``llamacpp:requests_deferred`` | gauge | requests waiting in the queue |
| ``llamacpp:n_busy_slots_per_decode`` | gauge | mean slots per batch |
| ``medgemma_gguf_http_requests_total{endpoint,status}`` | counter | HTTP answers |
| ``medgemma_gguf_requests_total{finish}`` | counter | replies by their end (stop, length, cancelled, timeout, error) |
| ``medgemma_gguf_requests_rejected_total`` | counter | requests refused because the queue was full (429) |
| ``medgemma_gguf_slots``, ``medgemma_gguf_slots_busy`` | gauge | parallel slots, and those in use |
| ``medgemma_gguf_queue_depth``, ``medgemma_gguf_queue_size`` | gauge | waiting requests, and the bound |
| ``medgemma_gguf_images_total`` | counter | images encoded and decoded |
| ``medgemma_gguf_batch_tokens_total`` | counter | tokens over all batches |
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest


class _Collector:
    def __init__(self, batcher: Any, http_counts: Counter, queue_size: int):
        self.batcher = batcher
        self.http_counts = http_counts
        self.queue_size = queue_size

    def collect(self) -> Iterator[Metric]:
        http = CounterMetricFamily("medgemma_gguf_http_requests", "HTTP answers by endpoint and status",
                                   labels=["endpoint", "status"])
        for (endpoint, status), count in sorted(self.http_counts.items()):
            http.add_metric([endpoint, status], count)
        yield http
        batcher = self.batcher
        if batcher is None:
            return
        stats = batcher.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield counter("llamacpp:prompt_tokens", "Prompt positions evaluated", stats.prompt_tokens)
        yield counter("llamacpp:prompt_tokens_cached", "Prompt positions re-used from a slot's cache",
                      stats.prompt_tokens_cached)
        yield counter("llamacpp:prompt_seconds", "Prompt processing time", stats.prompt_seconds)
        yield counter("llamacpp:tokens_predicted", "Generated tokens", stats.tokens_predicted)
        yield counter("llamacpp:tokens_predicted_seconds", "Generation time", stats.decode_seconds)
        yield counter("llamacpp:n_decode", "llama_decode batches", stats.n_decode)
        yield gauge("llamacpp:prompt_tokens_seconds", "Prompt tokens per second",
                    stats.prompt_tokens / stats.prompt_seconds if stats.prompt_seconds else 0.0)
        yield gauge("llamacpp:predicted_tokens_seconds", "Generated tokens per second per request",
                    stats.tokens_predicted / stats.decode_seconds if stats.decode_seconds else 0.0)
        yield gauge("llamacpp:requests_processing", "Requests in slots", batcher.busy_slots())
        yield gauge("llamacpp:requests_deferred", "Requests waiting in the queue", batcher.queue_depth())
        yield gauge("llamacpp:n_busy_slots_per_decode", "Mean slots per batch",
                    stats.busy_slots_per_decode / stats.n_decode if stats.n_decode else 0.0)
        finished = CounterMetricFamily("medgemma_gguf_requests", "Replies by how they ended", labels=["finish"])
        for finish in ("stop", "length", "cancelled", "timeout"):
            finished.add_metric([finish], stats.finished.get(finish, 0))
        finished.add_metric(["error"], stats.failed)
        yield finished
        yield counter("medgemma_gguf_requests_rejected", "Requests refused with 429 (queue full)", stats.rejected)
        yield gauge("medgemma_gguf_slots", "Parallel slots", batcher.n_slots)
        yield gauge("medgemma_gguf_slots_busy", "Slots in use", batcher.busy_slots())
        yield gauge("medgemma_gguf_queue_depth", "Requests waiting", batcher.queue_depth())
        yield gauge("medgemma_gguf_queue_size", "Requests that may wait", self.queue_size)
        yield counter("medgemma_gguf_images", "Images encoded and decoded", stats.n_images)
        yield counter("medgemma_gguf_batch_tokens", "Tokens over all batches", stats.batch_tokens)


def render_metrics(batcher: Any, http_counts: Counter, queue_size: int) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(batcher, http_counts, queue_size))
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
