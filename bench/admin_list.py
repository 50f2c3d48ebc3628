"""The admin API's store list at the fleet's size: GET /api/instances/ (HTTP Basic),
the first page and a search, beside the floor app running the same query in raw
sqlite3 on the same database file (Bottle on cheroot, JSON out)."""

from __future__ import annotations

import base64
import http.client
import json
import time
from urllib.parse import urlencode

from bench.stack import ADMIN_USER, BenchError, BenchStack


def get(port: int, path: str, headers: dict) -> tuple[float, dict]:
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
    return seconds, json.loads(body)


def timings(stack: BenchStack, query: dict, reps: int) -> tuple[list[float], list[float], int]:
    """(service seconds, floor seconds, total the service reported), `reps` of each."""
    token = base64.b64encode(f"{ADMIN_USER}:{stack.admin_password}".encode()).decode()
    auth = {"Authorization": f"Basic {token}"}
    qs = f"?{urlencode(query)}" if query else ""
    service, floor, total = [], [], 0
    for _ in range(reps):
        seconds, body = get(stack.service_port, f"/api/instances/{qs}", auth)
        service.append(seconds)
        total = body["total"]
        seconds, floor_body = get(stack.floor_port, f"/instances{qs}", {})
        floor.append(seconds)
        if floor_body["total"] != total:
            raise BenchError(f"floor list saw {floor_body['total']} stores, the API {total}")
    return service, floor, total
