"""One Stripe endpoint localstripe lacks (Checkout Sessions, the Customer Portal),
answered with Stripe's own fixture object; every request is kept for assertions."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from provisioner.testing import stripe_events


class StripeStub:
    """POSTs answered with the fixture `resource`, updated with `fields`; its id gets the
    request's number, as Stripe never gives one twice."""

    def __init__(self, resource: str, **fields):
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                stub.requests.append({"path": self.path,
                                      "auth": self.headers.get("Authorization"),
                                      "form": dict(urllib.parse.parse_qsl(body))})
                obj = stripe_events.resource(resource)
                obj.update(fields)
                obj["id"] = f"{fields.get('id', obj['id'])}_{len(stub.requests)}"
                payload = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
