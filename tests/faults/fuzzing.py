"""A real `provisioner serve` driven over raw sockets, for the fuzz and load tests.

Everything talks to loopback only: the service, a stand-in for Stripe's Checkout API
(localstripe has none), and clients that send from many 127.x.y.z addresses, so the
per-address limits (login throttle, public POST limits, the rejected-webhook quota) do
not stand between the generated requests and the code behind them.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from provisioner.testing.stack import free_port

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WEBHOOK_SECRET = "whsec_fuzz_" + "f" * 24
ADMIN_USER, ADMIN_PASSWORD, ADMIN_TOKEN = "admin", "fuzz-admin-pass-7", "fuzz-token-" + "t" * 20
# The admin's own address: never throttled, because nothing wrong is ever sent from it.
ADMIN_ADDRESS = "127.0.0.2"
START_SECONDS = 60


class _CheckoutHandler(BaseHTTPRequestHandler):
    """Answers `POST /v1/checkout/sessions` the way Stripe does, with a new session."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        number = self.server.sessions = getattr(self.server, "sessions", 0) + 1
        body = json.dumps({"id": f"cs_test_fuzz{number}", "object": "checkout.session",
                           "url": f"https://checkout.stripe.test/c/{number}",
                           "expires_at": int(time.time()) + 86400}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def stripe_checkout_stand_in():
    """A loopback Stripe that creates Checkout Sessions (the one call the service makes on
    the request path); its URL is the service's STRIPE_API_BASE."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CheckoutHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def service_env(root: Path, **overrides: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(root)),
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "BASE_DOMAIN": "stores.test",
        "PROVISIONER_DATA_DIR": str(root / "data"),
        "PROVISIONER_ENV_FILE": str(root / "none.env"),
        "PROVISIONER_ADMIN_USER": ADMIN_USER,
        "PROVISIONER_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "PROVISIONER_ADMIN_TOKEN": ADMIN_TOKEN,
        "INSTALLATION_ID": f"fuzz-{os.getpid()}",
        "CUSTOMER_DATA_ROOT": str(root / "customers"),
        "PORT_RANGE_START": "19700",
        "PORT_RANGE_END": "19799",
        **overrides,
    }


SEED = """
import json
from pony.orm import db_session
from provisioner import events, models
from provisioner.config import load_config
from provisioner.models import AnsibleRun, StripeEvent
from provisioner.testing import stripe_events

config = models.open_database(load_config())
for n in range(3):
    for evt in stripe_events.signup(subdomain=f"fuzz-shop-{n}", site_name=f"Fuzz {n}",
                                    email=f"owner{n}@example.com"):
        with db_session:
            events.apply(config, StripeEvent(stripe_id=evt["id"], type=evt["type"],
                                             payload=json.dumps(evt)))
with db_session:
    AnsibleRun(ident="fuzz-run", playbook="provision.yml", status="failed", rc=2,
               artifact_dir=str(config.data_dir / "ansible-runs" / "fuzz-run"))
"""


def seed_database(env: dict[str, str]) -> None:
    """Stores, jobs, events and a run for generated ids to find. In a process of its own:
    the test process has the unit tests' database bound."""
    subprocess.run([sys.executable, "-c", SEED], env=env, cwd=PROJECT, check=True,
                   timeout=120, capture_output=True)


@dataclass
class ServiceProcess:
    process: subprocess.Popen
    port: int
    root: Path
    log_path: Path

    @property
    def database(self) -> Path:
        return self.root / "data" / "provisioner.sqlite3"

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_mb(self) -> float:
        """Resident memory of the service process, from /proc."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def rows(self, sql: str, *args) -> list[tuple]:
        """Read the service's database from outside, as an operator would."""
        with sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=30) as db:
            return db.execute(sql, args).fetchall()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str, headers: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path, headers=headers or {})
            answer = connection.getresponse()
            return answer.status, answer.read()
        finally:
            connection.close()

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@contextmanager
def running_service(root: Path, *, worker: bool, seed: bool = False, **overrides: str):
    """`provisioner serve` (with or without its worker) on a free loopback port, answering
    /api/health/ before this yields; stopped (SIGTERM) afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    env = service_env(root, **overrides)
    if seed:
        seed_database(env)
    port = free_port()
    command = [str(BIN / "provisioner"), "serve", "--port", str(port)]
    if not worker:
        command.append("--no-worker")
    log_path = root / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=PROJECT, stdout=log,
                                   stderr=subprocess.STDOUT)
    service = ServiceProcess(process, port, root, log_path)
    try:
        _wait_healthy(service)
        yield service
    finally:
        service.stop()


def _wait_healthy(service: ServiceProcess) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if not service.alive():
            raise RuntimeError(f"provisioner serve exited:\n{service.log_tail()}")
        try:
            if service.get("/api/health/", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"provisioner serve not healthy in {START_SECONDS} s:\n"
                       f"{service.log_tail()}")


# -- raw HTTP -------------------------------------------------------------------------

@dataclass(frozen=True)
class RawRequest:
    """Exactly the bytes to send, from which loopback address; `kind` names the generator."""

    kind: str
    data: bytes
    source: str = "127.0.0.1"
    method: str = "GET"
    half_close: bool = False  # end the sending side after the data (a body cut short)


def send(port: int, request: RawRequest, timeout: float = 30) -> int | None:
    """The answer's status code, or None when the server closed without answering."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind((request.source, 0))
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(request.data)
            if request.half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # it answered early (a 413, a 400) and closed: read what it said
        answer = http.client.HTTPResponse(sock, method=request.method)
        try:
            answer.begin()
            answer.read()
        except (http.client.RemoteDisconnected, http.client.IncompleteRead,
                ConnectionResetError):
            return None
        finally:
            answer.close()
        return answer.status


def http_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
               body: bytes = b"", *, version: bytes = b"HTTP/1.1",
               content_length: bool = True) -> bytes:
    """One HTTP/1.x request; Host and Connection: close unless the headers say otherwise."""
    names = {name.lower() for name, _ in headers}
    lines = [method + b" " + target + b" " + version]
    if b"host" not in names:
        lines.append(b"Host: 127.0.0.1")
    if b"connection" not in names:
        lines.append(b"Connection: close")
    if content_length and b"content-length" not in names and b"transfer-encoding" not in names:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(body: bytes, size: int = 7) -> bytes:
    parts = [body[n:n + size] for n in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


# -- generated requests -----------------------------------------------------------------

WILDCARD = re.compile(r"<(\w+)(?::(\w+)(?::([^>]*))?)?>")
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"TRACE",
           b"get", b"FOO", b"G\xe9T"]
ODD_VALUES = ["", "1", "0", "-1", "2", str(2**63 - 1), str(2**63), str(2**64 + 7), "9" * 30,
              "9" * 5000, "1e5", "0x10", " 1", "1_0", "\u0663", "NaN", "true", "[]", "{}",
              "running", "failed", "accepted", "rejected", "a'b\"c<script>x</script>",
              "../../etc/passwd", "\x00", "\u00e9\u00ff", "\ud7ff", "%", "a" * 300,
              "\u202e\u0645", "fuzz-shop-1", "evt_1", "SELECT * FROM Instance"]
QUERY_NAMES = ["page", "per_page", "status", "q", "outcome", "target", "flash", "session_id",
               "x", "page[]"]
LATIN1_JUNK = [b"\xe9\xff\xfe", b"\x80\x81", b"caf\xe9", b"\xc3\x28", b"\xff" * 40, b"\x7f\x01"]


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> bytes:
    """Stripe's signature over any bytes (Stripe's own helper takes text only)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), b"%d." % timestamp + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}".encode()


def quote_bytes(raw: bytes) -> bytes:
    return b"".join(bytes([c]) if chr(c).isalnum() or c in b"-._~" else b"%%%02X" % c
                    for c in raw)


class RequestMaker:
    """Seeded generator of hostile and ordinary requests over every route of the app."""

    def __init__(self, rng, routes: list[tuple[str, str]], ids: list[int], csrf: str,
                 events: list[dict]):
        self.rng = rng
        self.routes = routes
        self.ids = ids
        self.csrf = csrf
        self.events = events  # real Stripe object shapes to sign and mutate
        self.sent_events: list[bytes] = []
        self.kinds = [("route", 42, self.route), ("webhook", 26, self.webhook),
                      ("public-json", 12, self.public_json), ("framing", 12, self.framing),
                      ("headers", 8, self.hostile_headers)]

    def make(self) -> RawRequest:
        total = sum(weight for _, weight, _ in self.kinds)
        pick = self.rng.uniform(0, total)
        for _, weight, build in self.kinds:
            pick -= weight
            if pick <= 0:
                return build()
        return self.kinds[0][2]()

    # -- pieces --

    def address(self, block: int) -> str:
        return f"127.{block}.{self.rng.randrange(256)}.{self.rng.randrange(1, 255)}"

    def odd(self) -> str:
        return self.rng.choice(ODD_VALUES)

    def encoded(self, text: str) -> bytes:
        """As a browser would send it, or raw Latin-1/UTF-8 bytes as an attacker might."""
        raw = text.encode("utf-8", "surrogatepass")
        return raw if self.rng.random() < 0.15 else quote_bytes(raw)

    def path_for(self, rule: str) -> bytes:
        def value(match: re.Match) -> str:
            _, kind, conf = match.groups()
            if kind == "int":
                if self.rng.random() < 0.55:
                    return str(self.rng.choice(self.ids))
                return self.odd() or "0"
            if kind == "re" and conf and re.fullmatch(r"[\w|-]+", conf):
                options = conf.split("|")
                return self.rng.choice(options) if self.rng.random() < 0.8 else self.odd()
            return self.odd()

        out = b""
        last = 0
        for match in WILDCARD.finditer(rule):
            out += rule[last:match.start()].encode() + self.encoded(value(match))
            last = match.end()
        return out + rule[last:].encode()

    def query(self) -> bytes:
        if self.rng.random() < 0.5:
            return b""
        pairs = [self.encoded(self.rng.choice(QUERY_NAMES)) + b"=" + self.encoded(self.odd())
                 for _ in range(self.rng.randrange(1, 4))]
        return b"?" + b"&".join(pairs)

    def auth(self) -> tuple[list[tuple[bytes, bytes]], str]:
        """An Authorization header (or none) and the address that sends it."""
        import base64

        choice = self.rng.randrange(6)
        if choice == 0:
            return [], self.address(1)
        if choice == 1:
            token = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode())
            return [(b"Authorization", b"Basic " + token)], ADMIN_ADDRESS
        if choice == 2:
            return [(b"Authorization", b"Bearer " + ADMIN_TOKEN.encode())], ADMIN_ADDRESS
        if choice == 3:
            token = base64.b64encode(f"{ADMIN_USER}:{self.odd()}".encode("utf-8", "replace"))
            return [(b"Authorization", b"Basic " + token)], self.address(2)
        junk = self.rng.choice([b"Basic " + self.rng.choice(LATIN1_JUNK), b"Basic %%%%",
                                b"Bearer " + self.rng.choice(LATIN1_JUNK), b"Digest x=y",
                                b"Basic " + b"A" * 3000, b"\xe9", b"Bearer", b"Basic Og=="])
        return [(b"Authorization", junk)], self.address(3)

    def form_or_json_body(self, method: bytes, rule: str) -> tuple[list, bytes]:
        if method != b"POST":
            return [], b"" if self.rng.random() < 0.8 else b"ignored body"
        if rule.startswith("/admin/"):
            choice = self.rng.randrange(5)
            if choice < 2:
                body = b"csrf=" + (self.csrf.encode() if choice == 0 else self.encoded(self.odd()))
                return [(b"Content-Type", b"application/x-www-form-urlencoded")], body
            if choice == 2:
                return [(b"Content-Type", b"multipart/form-data; boundary=zz; charset=nope")], \
                    b"--zz\r\nContent-Disposition: form-data; name=csrf\r\n\r\n\xe9\r\n--zz--"
            if choice == 3:
                return [(b"Content-Type", b"application/x-www-form-urlencoded")], \
                    b"csrf=" + self.rng.choice(LATIN1_JUNK)
            return [(b"Content-Type", b"application/json")], b"{}"
        if self.rng.random() < 0.6:
            return [(b"Content-Type", b"application/json")], b"{}"
        return [(b"Content-Type", self.rng.choice([b"text/plain", b"application/json; x",
                                                    b"\xe9/\xff", b""]))], self.json_text()

    # -- generators --

    def route(self) -> RawRequest:
        method, rule = self.rng.choice(self.routes)
        http_method = method.encode() if self.rng.random() < 0.85 else self.rng.choice(METHODS)
        auth, source = self.auth()
        extra, body = self.form_or_json_body(http_method, rule)
        target = self.path_for(rule) + self.query()
        return RawRequest("route", http_bytes(http_method, target, auth + extra, body),
                          source, http_method.decode("latin-1"))

    def hostile_headers(self) -> RawRequest:
        method, rule = self.rng.choice(self.routes)
        auth, source = self.auth()
        headers = list(auth)
        for _ in range(self.rng.randrange(1, 5)):
            headers.append(self.rng.choice([
                (b"X-Fuzz", self.rng.choice(LATIN1_JUNK)),
                (b"Origin", self.rng.choice([b"http://[::1", b"https://evil.example", b"null",
                                             b"http://\xe9\xff", b"http://127.0.0.1"])),
                (b"Referer", b"http://[" + self.rng.choice(LATIN1_JUNK)),
                (b"Cookie", b"a=" + self.rng.choice(LATIN1_JUNK) + b"; b"),
                (b"X-Forwarded-For", self.rng.choice([b"1.2.3.4, \xe9", b"::ffff:1.2.3.4",
                                                      b"2001:db8::1", b"x" * 500])),
                (b"X_Forwarded_For", b"9.9.9.9"),
                (b"Stripe-Signature", b"t=\xe9\xff,v1=" + self.rng.choice(LATIN1_JUNK)),
                (b"Accept-Language", b"\xff" * 100),
                (b"Content-Type", self.rng.choice(LATIN1_JUNK)),
                (b"Expect", b"100-continue"),
                (b"Host", self.rng.choice([b"\xe9\xff", b"", b"evil.example", b"[::1"])),
            ]))
        extra, body = self.form_or_json_body(method.encode(), rule)
        return RawRequest("headers", http_bytes(method.encode(), self.path_for(rule),
                                                headers + extra, body), source, method)

    def json_text(self) -> bytes:
        depth = self.rng.choice([50, 900, 5000, 100_000])
        return self.rng.choice([
            b"[" * depth + b"]" * depth,
            b'{"a":' * depth + b"1" + b"}" * depth,
            b'{"subdomain": ' + b"1" * 5000 + b"}",
            b'{"subdomain": "\\ud800abc", "site_name": "\\udfff", "email": "a@b.co"}',
            b'{"subdomain": NaN, "site_name": Infinity, "email": -Infinity}',
            b'{"subdomain": ["a"], "site_name": {"x": 1}, "email": 5}',
            b'{"subdomain": "a", "subdomain": "b"}',
            b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"null", b"[]", b'"text"', b"1e999",
            b'{"subdomain": "' + b"a" * 400_000 + b'"}',
            b'{"subdomain": "ok-shop\\u0000", "site_name": "S", "email": "a@b.co"}',
            b'{"subdomain": "xn--ls8h", "site_name": "\\u202e", "email": "\\u00e9@b.co"}',
            b"{", b"", b"{}" * 1000,
        ])

    def public_json(self) -> RawRequest:
        path = self.rng.choice([b"/api/check-subdomain/", b"/api/create-checkout/"])
        if self.rng.random() < 0.35:
            name = f"fz{self.rng.randrange(10**6)}"
            body = json.dumps({"subdomain": self.rng.choice([name, name.upper(), "www", "a",
                                                             "fuzz-shop-1", self.odd()]),
                               "site_name": self.rng.choice(["Shop", "", self.odd()]),
                               "email": self.rng.choice([f"{name}@example.com", "x",
                                                         self.odd()])}).encode()
        else:
            body = self.json_text()
        content_type = self.rng.choice([b"application/json", b"text/plain", b""])
        headers = [(b"Content-Type", content_type)] if content_type else []
        if self.rng.random() < 0.15:
            return RawRequest("public-json", http_bytes(
                b"POST", path, headers + [(b"Transfer-Encoding", b"chunked")], chunked(body)),
                self.address(5), "POST")
        return RawRequest("public-json", http_bytes(b"POST", path, headers, body),
                          self.address(5), "POST")

    def webhook(self) -> RawRequest:
        choice = self.rng.randrange(10)
        if choice < 3 or not self.sent_events:
            payload = self.fresh_event()
            self.sent_events.append(payload)
        elif choice == 3:
            payload = self.rng.choice(self.sent_events)  # a duplicate delivery
        elif choice < 7:
            payload = self.mutated_event()
        else:
            payload = self.fresh_event()
        signature = sign(payload, WEBHOOK_SECRET)
        variant = self.rng.randrange(12)
        if variant == 0:
            headers = []
        elif variant == 1:
            headers = [(b"Stripe-Signature", sign(payload, "whsec_other"))]
        elif variant == 2:
            stale = int(time.time()) - 3600
            headers = [(b"Stripe-Signature", sign(payload, WEBHOOK_SECRET, stale))]
        elif variant == 3:
            headers = [(b"Stripe-Signature", self.rng.choice([
                b"t=abc,v1=00", b"t=\xe9,v1=\xff", b",,,", b"v1=" + b"a" * 64,
                b"t=1," + b"v1=" + b"ab" * 32 + b"," + b"v1=00," * 2000, b"t=" + b"9" * 40,
                b"t=-1,v0=x", b"=", b"\xff" * 64]))]
        else:
            headers = [(b"Stripe-Signature", signature)]
        source = self.address(4) if self.rng.random() < 0.7 else "127.0.0.4"
        headers.append((b"Content-Type", b"application/json"))
        if self.rng.random() < 0.12:
            headers.append((b"Transfer-Encoding", b"chunked"))
            return RawRequest("webhook", http_bytes(b"POST", b"/api/webhook/stripe/", headers,
                                                    chunked(payload, self.rng.choice([1, 100,
                                                                                      4096]))),
                              source, "POST")
        return RawRequest("webhook", http_bytes(b"POST", b"/api/webhook/stripe/", headers,
                                                payload), source, "POST")

    def fresh_event(self) -> bytes:
        from provisioner.testing import stripe_events

        base = self.rng.choice(self.events)
        evt = dict(base, id=stripe_events.new_id("evt"), created=int(time.time()))
        return json.dumps(evt).encode()

    def mutated_event(self) -> bytes:
        from provisioner.testing import stripe_events

        evt = json.loads(self.fresh_event())
        mutation = self.rng.randrange(14)
        if mutation == 0:
            evt.pop("id")
        elif mutation == 1:
            evt["id"] = self.rng.choice([5, None, "x", "evt_\u00fc", "evt_" + "a" * 400, [],
                                         "evt_a b"])
        elif mutation == 2:
            evt["type"] = self.rng.choice(["", 5, "A B", "x" * 500, None, "invoice..paid"])
        elif mutation == 3:
            evt["data"] = self.rng.choice([[], "x", None, {"object": []}, {"object": None}, 5])
        elif mutation == 4:
            evt["created"] = self.rng.choice(["x", 1e300, True, None, -1, 2**70])
        elif mutation == 5:
            return json.dumps(evt).encode()[:-1] + b', "deep": ' + b"[" * 100_000 + \
                b"]" * 100_000 + b"}"
        elif mutation == 6:
            return json.dumps(evt).encode()[:-1] + b', "big": ' + b"7" * 6000 + b"}"
        elif mutation == 7:
            return self.rng.choice([b"[1, 2]", b'"evt"', b"123", b"null", b"{}", b"{"])
        elif mutation == 8:
            return json.dumps(evt).encode().replace(b'"id": "evt_', b'"id": "evt_\\ud800', 1)
        elif mutation == 9:
            return b"\xef\xbb\xbf" + json.dumps(evt).encode()
        elif mutation == 10:
            return json.dumps(evt).encode() + b"\xff\xfe"
        elif mutation == 11:
            evt["data"]["object"]["metadata"] = {"subdomain": "\ud800", "site_name": "x" * 9000}
            return json.dumps(evt).encode()
        elif mutation == 12:
            evt["id"] = stripe_events.new_id("evt")
            evt["type"] = "charge.succeeded"  # a type nobody handles: recorded, ignored
        else:
            return json.dumps(evt).encode()[:-1] + b', "nan": NaN}'
        return json.dumps(evt).encode()

    def framing(self) -> RawRequest:
        """Request lines, lengths and chunking that a well-behaved client never sends."""
        source = self.address(6)
        body = b'{"subdomain": "frame-shop"}'
        post = (b"POST", b"/api/check-subdomain/")
        cases = [
            (http_bytes(*post, [(b"Transfer-Encoding", b"chunked")], b"zz\r\nabc\r\n0\r\n\r\n"),
             False),
            (http_bytes(*post, [(b"Transfer-Encoding", b"chunked")], b"3\r\nabcXX0\r\n\r\n"),
             False),
            (http_bytes(*post, [(b"Transfer-Encoding", b"chunked")],
                        b"ffffffffffffffffffffff\r\nabc"), True),
            (http_bytes(*post, [(b"Transfer-Encoding", b"chunked")], b"-1\r\nabc\r\n0\r\n\r\n"),
             False),
            (http_bytes(*post, [(b"Transfer-Encoding", b"chunked")], b"5\r\nab"), True),
            (http_bytes(*post, [(b"Transfer-Encoding", b"chunked")], b"1b;ext=1\r\n" + body +
                        b"\r\n0\r\n\r\n"), False),
            (http_bytes(*post, [(b"Transfer-Encoding", b"chunked")], b"f" * 20_000), True),
            (http_bytes(*post, [(b"Transfer-Encoding", b"gzip")], body), True),
            (http_bytes(*post, [(b"Transfer-Encoding", b"chunked, gzip")], chunked(body)), False),
            (http_bytes(*post, [(b"Transfer-Encoding", b"gzip, chunked")], chunked(body)), False),
            (http_bytes(*post, [(b"Transfer-Encoding", b"chunked"),
                                (b"Content-Length", b"3")], chunked(body)), False),
            (http_bytes(*post, [(b"Content-Length", b"99999999999")], body), True),
            (http_bytes(*post, [(b"Content-Length", b"-5")], body), True),
            (http_bytes(*post, [(b"Content-Length", b"abc")], body), True),
            (http_bytes(*post, [(b"Content-Length", b"5"), (b"Content-Length", b"6")], body),
             True),
            (http_bytes(*post, [(b"Content-Length", b"400")], body), True),  # cut short
            (http_bytes(*post, [(b"Content-Length", b"600000")], b"a" * 1000), True),
            (http_bytes(*post, [(b"Expect", b"100-continue")], body), False),
            (http_bytes(b"GET", b"/api/health/", [], version=b"HTTP/2.0"), False),
            (http_bytes(b"GET", b"/api/health/", [], version=b"HTTP/1.0"), False),
            (http_bytes(b"GET", b"/api/health/", [], version=b"HTTP/1.10"), False),
            (http_bytes(b"GET", b"/api/health/", [], version=b"HTTPS/1.1"), False),
            (http_bytes(b"GET", b"http://127.0.0.1/api/status/", []), False),
            (http_bytes(b"GET", b"*", []), False),
            (http_bytes(b"OPTIONS", b"*", []), False),
            (http_bytes(b"CONNECT", b"127.0.0.1:80", []), False),
            (http_bytes(b"GET", b"/api/\x00health/", []), False),
            (http_bytes(b"GET", b"/%zz%", []), False),
            (http_bytes(b"GET", b"/" + b"a" * 70_000, []), False),
            (http_bytes(b"GET", b"/api/health/", [(b"X-Big", b"b" * 70_000)]), False),
            (http_bytes(b"GET", b"/api/health/", [(b"NoColon", b"")]).replace(b"NoColon: ",
                                                                              b"NoColon"),
             False),
            (http_bytes(b"GET", b"/api/health/", [(b"X-Fold", b"a\r\n b")]), False),
            (http_bytes(b"GET", b"/api/health/", [(b"Bad Name", b"x")]), False),
            (b"\r\nGET /api/health/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
            (b"GET /api/health/ HTTP/1.1\nHost: x\nConnection: close\n\n", True),
            (b"GARBAGE\r\n\r\n", False),
            (b"GET /\r\n\r\n", False),
            (b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", False),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, True),
        ]
        data, half_close = self.rng.choice(cases)
        return RawRequest("framing", data, source, "GET", half_close)


def stripe_event_shapes() -> list[dict]:
    """Events of Stripe's real object shapes (its fixtures, our ids): the types the service
    handles and one it ignores."""
    from provisioner.testing import stripe_events as se

    customer, subscription = se.new_id("cus"), se.new_id("sub")
    shapes = se.signup(subdomain="fuzz-new-shop", site_name="New", email="new@example.com")
    shapes.append(se.event("invoice.payment_failed", se.invoice(
        customer=customer, subscription=subscription, status="open")))
    for event_type, status in (("customer.subscription.updated", "active"),
                               ("customer.subscription.updated", "past_due"),
                               ("customer.subscription.deleted", "canceled")):
        sub = se.resource("subscription")
        sub.update(id=subscription, customer=customer, status=status)
        shapes.append(se.event(event_type, sub))
    session = se.checkout_session(subdomain="fuzz-expired", site_name="E",
                                  email="e@example.com", customer=customer,
                                  subscription=subscription)
    shapes.append(se.event("checkout.session.expired", session))
    shapes.append(se.event("charge.succeeded", se.resource("charge")))
    return shapes
