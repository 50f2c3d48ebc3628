"""The floor app: the least a webhook endpoint and an admin list can do, on the same
stack as the service (Bottle on cheroot, as many threads), run as its own process.

- POST /webhook: stripe.Webhook.construct_event (the signature check), then 200.
- GET /instances?q=&per_page=: the admin list's query in raw sqlite3 (read-only, one
  connection per thread) on the service's own database file, as JSON.

    python -m bench.floor_app --port P --database DB [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import threading

import bottle
import stripe
from cheroot import wsgi

COLUMNS = ("id", "subdomain", "site_name", "admin_email", "status", "desired_state",
           "status_message", "live", "admin_hold", "port", "docker_host",
           "welcome_sent_at", "provisioned_at")


def make_app(secret: str, database: str) -> bottle.Bottle:
    app = bottle.Bottle()
    local = threading.local()

    @app.post("/webhook")
    def webhook():
        payload = bottle.request.body.read()
        try:
            stripe.Webhook.construct_event(
                payload, bottle.request.headers.get("Stripe-Signature", ""), secret)
        except (ValueError, stripe.SignatureVerificationError) as exc:
            bottle.response.status = 400
            return {"error": str(exc)}
        return {"received": True}

    @app.get("/instances")
    def instances():
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True,
                                                check_same_thread=False)
        per_page = min(int(bottle.request.query.get("per_page") or 50), 200)
        needle = (bottle.request.query.get("q") or "").strip().lower()
        where, args = "", []
        if needle:
            where = ' WHERE instr(lower("subdomain"), ?) > 0 OR instr(lower("admin_email"), ?) > 0'
            args = [needle, needle]
        columns = ", ".join(f'"{c}"' for c in COLUMNS)
        total = conn.execute(f'SELECT COUNT(*) FROM "Instance"{where}', args).fetchone()[0]  # noqa: S608
        rows = conn.execute(f'SELECT {columns} FROM "Instance"{where} '  # noqa: S608
                            'ORDER BY "id" DESC LIMIT ?', [*args, per_page]).fetchall()
        bottle.response.content_type = "application/json"
        return json.dumps({"total": total, "items": [dict(zip(COLUMNS, row, strict=True))
                                                     for row in rows]})

    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args()
    secret = os.environ["STRIPE_WEBHOOK_SECRET"]
    server = wsgi.Server(("127.0.0.1", args.port), make_app(secret, args.database),
                         numthreads=args.threads, request_queue_size=256)
    try:
        server.start()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
