"""GET /metrics: the server's and the cluster's numbers in Prometheus' text format (prometheus_client writes it).

The HTTP layer counts requests by route and status, and finished choices by reason; the engine's statistics
(requests running and waiting, prompt and generated tokens, prefill and decode time) and the coordinator's
(token-expert pairs served hot, moved or cold; each worker's busy time) are read when scraped. Each scrape gets a
registry of its own, so that one process may serve several apps (tests) without their names colliding.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


class Counters:
    """What the HTTP layer counts (thread-safe). Any path but the API's own counts as "other", so that a scanner
    trying paths cannot grow the label set without bound."""

    def __init__(self):
        self.lock = threading.Lock()
        self.answered: Counter = Counter()  # (route, status) -> requests answered
        self.ended: Counter = Counter()  # finish reason -> choices
        self.started = time.time()

    def request(self, route: str, status: int) -> None:
        with self.lock:
            self.answered[(route if route in ROUTES else "other", str(status))] += 1

    def finished(self, reason: str) -> None:
        with self.lock:
            self.ended[reason] += 1


class _Snapshot:
    """A collector that yields the families made for one scrape."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return iter(self.families)


def _rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def families(counters: Counters, served) -> list:
    found = []

    def add(kind, name, doc, value=None, labels=None, samples=()):
        family = kind(name, doc, value=None if labels else value, labels=labels)
        for label_values, v in samples:
            family.add_metric(label_values, v)
        found.append(family)

    counter, gauge = functools.partial(add, CounterMetricFamily), functools.partial(add, GaugeMetricFamily)

    with counters.lock:
        requests = dict(counters.answered)
        finished = dict(counters.ended)
    counter("fiddler_http_requests", "HTTP requests answered, by route and status code", None,
            labels=["route", "status"], samples=[([route, status], n) for (route, status), n in requests.items()])
    counter("fiddler_choices_finished", "Choices (engine requests) ended, by reason", None, labels=["reason"],
            samples=[([reason], n) for reason, n in finished.items()])

    stats = served.engine.stats()
    gauge("fiddler_requests_running", "Engine requests in the decoding batch now", stats.running)
    gauge("fiddler_requests_waiting", "Engine requests submitted and not started yet", stats.waiting)
    counter("fiddler_requests_finished", "Engine requests ended since the engine started", stats.finished)
    counter("fiddler_prompt_tokens", "Prompt tokens read (prefilled)", stats.prompt_tokens)
    counter("fiddler_generation_tokens", "New tokens generated", stats.generated_tokens)
    counter("fiddler_prefill_seconds", "Engine time spent reading prompts", stats.prefill_seconds)
    counter("fiddler_decode_seconds", "Engine time spent in decoding steps", stats.decode_seconds)
    gauge("fiddler_prefill_tokens_per_second", "Prompt tokens over prefill time since the start",
          _rate(stats.prompt_tokens, stats.prefill_seconds))
    gauge("fiddler_decode_tokens_per_second", "Generated tokens over decoding time since the start (all streams)",
          _rate(stats.generated_tokens, stats.decode_seconds))
    gauge("fiddler_degraded", "1 while the cluster cannot serve (a worker down for good)",
          1.0 if served.health() else 0.0)

    coordinator = served.coordinator
    if coordinator is not None:
        dispatch = coordinator.dispatcher.stats  # plain numbers, read while the engine may add to them
        hot, moved, cold = dispatch.hot_pairs, dispatch.moved_pairs, dispatch.cold_pairs
        counter("fiddler_expert_pairs", "Token-expert pairs, by where the expert ran", None, labels=["where"],
                samples=[(["hot"], hot), (["moved"], moved), (["cold"], cold)])
        gauge("fiddler_expert_hit_rate", "Share of token-expert pairs served by experts on the device",
              hot / (hot + moved + cold) if hot + moved + cold else 0.0)
        window = max(1e-9, time.time() - dispatch.started)
        links = list(coordinator.links)
        counter("fiddler_worker_busy_seconds", "Time each worker spent computing experts", None, labels=["worker"],
                samples=[([link.name], link.busy_seconds) for link in links])
        gauge("fiddler_worker_busy_share", "Share of the time since the counts began that each worker was busy",
              labels=["worker"], samples=[([link.name], min(1.0, link.busy_seconds / window)) for link in links])
    return found


def exposition(counters: Counters, served) -> tuple[bytes, str]:
    """The text a Prometheus scrape gets, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families(counters, served)))
    return generate_latest(registry), CONTENT_TYPE_LATEST
