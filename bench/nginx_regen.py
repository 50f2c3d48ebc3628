"""`provisioner nginx` (maintenance.regenerate_vhosts: every live store's vhost
re-rendered, prune, one nginx -t and reload) over N vhosts with nothing changed, beside
the floor: a plain `nginx -t` of the same configuration (it parses all N vhosts)."""

from __future__ import annotations

import re
import time

from bench.stack import BenchStack, Timed, run, timed_command

SUMMARY = re.compile(r"^nginx: (.*) in ([0-9.]+) s$", re.MULTILINE)


def cli(stack: BenchStack, timeout: float) -> Timed:
    return timed_command(stack, "nginx", SUMMARY, timeout)


def nginx_t(stack: BenchStack, reps: int) -> list[float]:
    nginx = stack.nginx
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        run([nginx.nginx_bin, "-c", str(nginx.conf), "-e", str(nginx.root / "error.log"),
             "-t", "-q"])
        times.append(time.perf_counter() - started)
    return times
