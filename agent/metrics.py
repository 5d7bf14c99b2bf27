"""Prometheus metrics of the agent ([agent] metrics_port, on 127.0.0.1 only).

A custom collector reads the kernel at scrape time, so the numbers are never
stale and nothing is kept in between.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .errors import JobcageError

if TYPE_CHECKING:
    from .server import Agent


class JobCollector(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["job_id", "owner"]
        jobs = GaugeMetricFamily("jobcage_jobs", "Jobs registered and not ended")
        procs = GaugeMetricFamily("jobcage_job_processes", "Processes in the job's cgroup", labels=labels)
        pmax = GaugeMetricFamily("jobcage_job_pids_max", "pids.max of the job", labels=labels)
        hits = CounterMetricFamily("jobcage_job_pids_limit_hits", "Forks refused by pids.max", labels=labels)
        cpu = CounterMetricFamily("jobcage_job_cpu_seconds", "CPU used by the job's cgroup", labels=labels)
        frozen = GaugeMetricFamily("jobcage_job_suspended", "1 while the job is frozen", labels=labels)
        lost = CounterMetricFamily("jobcage_job_events_lost", "Trace events lost", labels=labels)
        idents = GaugeMetricFamily("jobcage_job_identities", "Distinct uids seen in the job", labels=labels)
        m = self.agent.manager
        active = m.store.jobs("active")
        jobs.add_metric([], len(active))
        for job in active:
            name = job["job_id"]
            try:
                cg = m.held(job)   # jobcage's cgroup or the batch system's (attach mode)
                stats = cg.pids_stats()
                lv = [name, str(job["owner_uid"])]
                procs.add_metric(lv, len(cg.pids()))
                if stats["max"] is not None:
                    pmax.add_metric(lv, stats["max"])
                if stats["limit_hits"] is not None:
                    hits.add_metric(lv, stats["limit_hits"])
                ns = cg.cpu_usage_ns()
                if ns is not None:
                    cpu.add_metric(lv, ns / 1e9)
                frozen.add_metric(lv, 1 if cg.has_freeze and cg.frozen() else 0)
                lost.add_metric(lv, job["events_lost"] or 0)
                idents.add_metric(lv, len(m.store.identities(job["jid"])))
            except JobcageError:
                continue  # ended between the listing and the read
        yield from (jobs, procs, pmax, hits, cpu, frozen, lost, idents)
        yield from control_metrics(self.agent)


def control_metrics(agent: Agent) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The control socket: what it refused (per reason), served, queued and holds now."""
    control = getattr(agent, "control", None)
    if control is None:
        return
    st = control.stats()
    refused = CounterMetricFamily("jobcage_control_refused", "Control connections refused or dropped, by reason",
                                  labels=["reason"])
    for reason, n in st["refused"].items():
        refused.add_metric([reason], n)
    reqs = CounterMetricFamily("jobcage_control_requests", "Complete requests read, by lane", labels=["lane"])
    for lane, n in st["requests"].items():
        reqs.add_metric([lane], n)
    queued = CounterMetricFamily("jobcage_control_queued", "Non-root connections that waited for a slot of their uid")
    queued.add_metric([], st["queued_total"])
    conns = GaugeMetricFamily("jobcage_control_connections", "Control connections held now", labels=["lane", "state"])
    conns.add_metric(["root", "active"], st["root_active"])
    conns.add_metric(["user", "active"], st["user_active"])
    conns.add_metric(["user", "waiting"], st["user_waiting"])
    yield from (refused, reqs, queued, conns)


class ExportCollector(Collector):
    """Per sink of [export]: records sent, re-sent from the store, dropped from the memory queue (sent from
    the store instead), pending in the store, and how old the oldest pending record is."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        lv = ["sink"]
        fams = {"sent": CounterMetricFamily("jobcage_export_sent", "Records the sink accepted", labels=lv),
                "resent": CounterMetricFamily("jobcage_export_resent", "Records sent from the store's backlog "
                                              "(after an outage, a restart or a full queue)", labels=lv),
                "dropped": CounterMetricFamily("jobcage_export_dropped", "Records dropped from the memory "
                                               "queue (the store still has them)", labels=lv),
                "failures": CounterMetricFamily("jobcage_export_failures", "Failed sends", labels=lv),
                "pending": GaugeMetricFamily("jobcage_export_pending", "Records in the store not yet sent",
                                             labels=lv),
                "lag_seconds": GaugeMetricFamily("jobcage_export_lag_seconds", "Age of the oldest record not "
                                                 "yet sent (0 when none)", labels=lv)}
        exporter = getattr(self.agent, "exporter", None)
        for st in exporter.stats() if exporter is not None else []:
            for key, fam in fams.items():
                fam.add_metric([st["sink"]], st[key])
        yield from fams.values()


SCRAPERS = 4          # concurrent metrics connections; more are closed (after 50 ms)
SCRAPE_TIMEOUT = 10   # seconds of silence before a metrics connection is dropped


def serve(agent: Agent, port: int) -> None:
    """prometheus_client's WSGI server, but bounded: its thread-per-connection server would let any local
    user (127.0.0.1 is everyone's) make the root agent hold a thread per idle connection."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

    registry = CollectorRegistry()
    registry.register(JobCollector(agent))
    registry.register(ExportCollector(agent))
    slots = threading.BoundedSemaphore(SCRAPERS)

    class Server(ThreadingWSGIServer):
        request_queue_size = 64   # refused connections are closed at once; a short backlog only drops SYNs

        def process_request(self, request: object, client_address: object) -> None:
            if not slots.acquire(timeout=0.05):   # a scraper's previous thread may be just finishing
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except Exception:
                slots.release()
                raise

        def process_request_thread(self, request: object, client_address: object) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                slots.release()

    class Handler(WSGIRequestHandler):
        timeout = SCRAPE_TIMEOUT

        def log_message(self, format: str, *args: object) -> None:
            pass  # no line per scrape

    httpd = make_server("127.0.0.1", port, make_wsgi_app(registry), Server, handler_class=Handler)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
