"""The admin API's store list at the fleet's size: GET /api/instances/ (HTTP Basic),
the first page and a search, beside the floor app running the same query in raw
sqlite3 on the same database file (Bottle on cheroot, JSON out); the admin pages
(dashboard, store list) beside the same floor; `provisioner stats` beside the CLI
doing nothing (`provisioner --help`)."""

from __future__ import annotations

import base64
import http.client
import json
import time
from urllib.parse import urlencode

from bench.stack import ADMIN_USER, VENV_BIN, BenchError, BenchStack, run


def get(port: int, path: str, headers: dict, as_json: bool = True) -> tuple[float, dict]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    seconds = time.perf_counter() - started
    if response.status != 200:
        raise BenchError(f"GET {path} answered {response.status}: {body[:300]!r}")
    return seconds, json.loads(body) if as_json else {"bytes": len(body)}


def auth(stack: BenchStack) -> dict:
    token = base64.b64encode(f"{ADMIN_USER}:{stack.admin_password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def timings(stack: BenchStack, query: dict, reps: int) -> tuple[list[float], list[float], int]:
    """(service seconds, floor seconds, total the service reported), `reps` of each."""
    qs = f"?{urlencode(query)}" if query else ""
    service, floor, total = [], [], 0
    for _ in range(reps):
        seconds, body = get(stack.service_port, f"/api/instances/{qs}", auth(stack))
        service.append(seconds)
        total = body["total"]
        seconds, floor_body = get(stack.floor_port, f"/instances{qs}", {})
        floor.append(seconds)
        if floor_body["total"] != total:
            raise BenchError(f"floor list saw {floor_body['total']} stores, the API {total}")
    return service, floor, total


def page_timings(stack: BenchStack, path: str, reps: int) -> tuple[list[float], list[float]]:
    """(service seconds for the HTML page, floor seconds for the raw first page)."""
    service, floor = [], []
    for _ in range(reps):
        service.append(get(stack.service_port, path, auth(stack), as_json=False)[0])
        floor.append(get(stack.floor_port, "/instances", {})[0])
    return service, floor


def stats_timings(stack: BenchStack, reps: int) -> tuple[list[float], list[float]]:
    """(`provisioner stats` seconds, `provisioner --help` seconds)."""
    service, floor = [], []
    for _ in range(reps):
        for argv, into in ((["stats"], service), (["--help"], floor)):
            started = time.perf_counter()
            run([str(VENV_BIN / "provisioner"), *argv], timeout=120, env=stack.env())
            into.append(time.perf_counter() - started)
    return service, floor
