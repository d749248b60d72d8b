"""Prometheus metrics of one vna process. Imports nothing from vna: every layer may use it.

One `Metrics` object per process (tests build their own, each on its own registry). Under several workers
(gateway/workers.py) each worker records into files under PROMETHEUS_MULTIPROC_DIR (prometheus_client's
multiprocess mode, chosen by that variable when prometheus_client is imported) and whichever worker
answers /metrics reports the sum over all of them: counters and histograms summed, gauges of the workers
alive summed ("livesum").
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.associations_active = Gauge("vna_dimse_associations_active", "Open DIMSE associations", registry=r,
                                         multiprocess_mode="livesum")
        self.associations_total = Counter("vna_dimse_associations_total",
                                          "DIMSE associations by outcome (accepted, rejected, aborted)",
                                          ["outcome"], registry=r)
        self.dimse_requests = Counter("vna_dimse_requests_total", "DIMSE requests by service and status class",
                                      ["service", "status"], registry=r)
        self.dimse_latency = Histogram("vna_dimse_request_seconds", "DIMSE request handling time by service",
                                       ["service"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stored_instances = Counter("vna_ingest_instances_total", "Instances ingested by outcome and protocol",
                                        ["outcome", "protocol"], registry=r)
        self.stored_bytes = Counter("vna_ingest_bytes_total", "Bytes of instances stored", ["protocol"], registry=r)
        self.ingest_latency = Histogram("vna_ingest_seconds", "Time to store and index one instance",
                                        ["protocol"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ingest_failures = Counter("vna_ingest_failures_total", "Instances refused or failed, by reason",
                                       ["reason"], registry=r)
        self.inflight = Gauge("vna_inflight_requests", "Requests being handled now (a scaling signal)",
                              ["protocol"], registry=r, multiprocess_mode="livesum")
        self.http_requests = Counter("vna_http_requests_total", "HTTP requests by route, method and status class",
                                     ["route", "method", "status"], registry=r)
        self.http_latency = Histogram("vna_http_request_seconds", "HTTP request handling time by route",
                                      ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.orphans_removed = Counter("vna_orphan_objects_removed_total",
                                       "Objects removed because no index row referenced them", registry=r)
        self.sent_instances = Counter("vna_retrieve_instances_total", "Instances sent by C-MOVE/C-GET by outcome",
                                      ["service", "outcome"], registry=r)
        self.storage_moves = Counter("vna_storage_moves_total",
                                     "Objects moved between storage classes, by outcome (moved, abandoned, failed)",
                                     ["outcome"], registry=r)
        self.storage_move_bytes = Counter("vna_storage_move_bytes_total",
                                          "Bytes copied to another storage class's pool", registry=r)

    def exposition(self) -> bytes:
        """The text format of every metric: this process's, or all workers' summed in multiprocess mode."""
        if os.environ.get(MULTIPROCESS_DIR):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
