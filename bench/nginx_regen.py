"""`provisioner nginx` (maintenance.regenerate_vhosts: every live store's vhost
re-rendered, prune, one nginx -t and reload) over N vhosts with nothing changed, beside
the floor: a plain `nginx -t` of the same configuration (it parses all N vhosts)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from bench.stack import VENV_BIN, BenchError, BenchStack, run

SUMMARY = re.compile(r"^nginx: (.*) in ([0-9.]+) s$", re.MULTILINE)


@dataclass
class Regen:
    wall: float
    inner: float
    summary: str


def cli(stack: BenchStack, timeout: float) -> Regen:
    started = time.perf_counter()
    result = run([str(VENV_BIN / "provisioner"), "nginx", "--timeout", str(timeout)],
                 timeout=timeout, check=False, env=stack.env())
    wall = time.perf_counter() - started
    match = SUMMARY.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise BenchError(f"provisioner nginx failed (rc {result.returncode}): "
                         f"{(result.stdout + result.stderr).strip()[-1500:]}")
    return Regen(wall, float(match.group(2)), match.group(0))


def nginx_t(stack: BenchStack, reps: int) -> list[float]:
    nginx = stack.nginx
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        run([nginx.nginx_bin, "-c", str(nginx.conf), "-e", str(nginx.root / "error.log"),
             "-t", "-q"])
        times.append(time.perf_counter() - started)
    return times
