"""Prometheus metrics: webhook counters kept in-process, the rest read from the DB."""

from __future__ import annotations

import threading
from collections import Counter

from pony.orm import count, select

from provisioner.models import AnsibleRun, Instance, Job

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class WebhookMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.results: Counter[str] = Counter()
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe(self, result: str, seconds: float) -> None:
        with self._lock:
            self.results[result] += 1
            self.latency_sum += seconds
            self.latency_count += 1
            for n, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.buckets[n] += 1


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def render(webhooks: WebhookMetrics) -> str:
    """Needs a db_session. The text exposition format."""
    lines = ["# HELP provisioner_webhooks_total Stripe webhooks received, by result.",
             "# TYPE provisioner_webhooks_total counter"]
    with webhooks._lock:
        for result, n in sorted(webhooks.results.items()):
            lines.append(f'provisioner_webhooks_total{{result="{_label(result)}"}} {n}')
        lines += ["# HELP provisioner_webhook_seconds Time to answer a Stripe webhook.",
                  "# TYPE provisioner_webhook_seconds histogram"]
        for bound, n in zip(LATENCY_BUCKETS, webhooks.buckets, strict=True):
            lines.append(f'provisioner_webhook_seconds_bucket{{le="{bound}"}} {n}')
        lines += [f'provisioner_webhook_seconds_bucket{{le="+Inf"}} {webhooks.latency_count}',
                  f"provisioner_webhook_seconds_sum {webhooks.latency_sum:.6f}",
                  f"provisioner_webhook_seconds_count {webhooks.latency_count}"]
    lines += ["# HELP provisioner_jobs Jobs by kind and state.",
              "# TYPE provisioner_jobs gauge"]
    for kind, state, n in select((j.kind, j.state, count(j)) for j in Job):
        lines.append(f'provisioner_jobs{{kind="{_label(kind)}",state="{_label(state)}"}} {n}')
    lines += ["# HELP provisioner_instances Stores by actual state.",
              "# TYPE provisioner_instances gauge"]
    for status, n in select((i.status, count(i)) for i in Instance):
        lines.append(f'provisioner_instances{{status="{_label(status)}"}} {n}')
    lines += ["# HELP provisioner_ansible_run_seconds Duration of finished ansible runs.",
              "# TYPE provisioner_ansible_run_seconds summary"]
    by_playbook: dict[str, list[float]] = {}
    # Plain rows, not objects: every finished run is read on each scrape.
    for playbook, started_at, finished_at in select(
            (r.playbook, r.started_at, r.finished_at) for r in AnsibleRun
            if r.finished_at is not None):
        by_playbook.setdefault(playbook, []).append((finished_at - started_at).total_seconds())
    for playbook, values in sorted(by_playbook.items()):
        label = f'playbook="{_label(playbook)}"'
        lines.append(f"provisioner_ansible_run_seconds_sum{{{label}}} {sum(values):.3f}")
        lines.append(f"provisioner_ansible_run_seconds_count{{{label}}} {len(values)}")
    return "\n".join(lines) + "\n"
