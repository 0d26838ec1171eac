"""The server's Prometheus metrics, on a registry of its own (several servers may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("prlhf_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("prlhf_request_latency_seconds", "time from request to last byte", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("prlhf_time_to_first_token_seconds", "time from request to first streamed "
                                     "text", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("prlhf_batch_size", "rows decoded together in one batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("prlhf_queue_depth", "requests waiting for a batch", registry=r)
        self.tokens = Counter("prlhf_generated_tokens", "tokens decoded", registry=r)
        self.tokens_per_second = Gauge("prlhf_batch_tokens_per_second", "tokens/s of the last batch", registry=r)
        self.unknown_users = Counter("prlhf_unknown_user_requests", "requests whose user the table does not hold "
                                     "(answered with the generic user)", registry=r)
        self.rejected = Counter("prlhf_rejected_requests", "requests refused because the server was full or "
                                "stopping, or timed out", ["reason"], registry=r)
        self.feedback = Counter("prlhf_feedback", "comparisons committed to the store, by choice", ["choice"],
                                registry=r)
        self.onboarding = Histogram("prlhf_onboarding_seconds", "from queueing a new user's fit to serving their row",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.reloads = Counter("prlhf_user_table_reloads", "new user-table versions swapped in", registry=r)
        self.users = Gauge("prlhf_users", "users in the served table", registry=r)
        self.table_bytes = Gauge("prlhf_user_table_bytes", "bytes the served user table takes in memory (rows, "
                                 "shared parameters and the id registry)", registry=r)
        self.prefix_bytes = Gauge("prlhf_prefix_cache_bytes", "bytes of cached user prefixes (KV of [BOS] + soft "
                                  "tokens)", registry=r)
        self.prefix_hit_rate = Gauge("prlhf_prefix_cache_hit_ratio", "share of rows whose user prefix was cached",
                                     registry=r)

    def observe_batch(self, stats) -> None:
        self.batch_size.observe(stats.rows)
        self.tokens.inc(stats.rows)
        if stats.seconds > 0:
            self.tokens_per_second.set(stats.rows / stats.seconds)
