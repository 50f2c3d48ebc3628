"""A local nginx (own prefix, loopback ports, self-signed wildcard) for tests and the demo."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NGINX_CONF = """\
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 512; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    server_names_hash_bucket_size 128;
    # Like Debian's stock config: a default server for plain HTTP only. On the
    # TLS port, unknown names reach whatever server nginx takes first: the
    # provisioner's catch-all vhost must be that one.
    server {{
        listen 127.0.0.1:{http_port} default_server;
        return 404;
    }}
    include {root}/sites/*.conf;
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def make_wildcard_cert(directory: Path, base_domain: str) -> tuple[Path, Path]:
    cert, key = directory / "wildcard.pem", directory / "wildcard.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN=*.{base_domain}",
         "-addext", f"subjectAltName=DNS:*.{base_domain},DNS:{base_domain}"],
        check=True, capture_output=True)
    key.chmod(0o600)
    return cert, key


class LocalNginx:
    """nginx with its own prefix under `root`, listening on loopback ports only."""

    def __init__(self, root: Path, base_domain: str, http_port: int | None = None,
                 https_port: int | None = None, nginx_bin: str = "nginx"):
        self.root = root
        self.base_domain = base_domain
        self.http_port = http_port or free_port()
        self.https_port = https_port or free_port()
        self.nginx_bin = nginx_bin
        self.conf = root / "nginx.conf"
        self.sites = root / "sites"

    def start(self) -> LocalNginx:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        self.sites.mkdir(exist_ok=True)
        self.cert, self.key = make_wildcard_cert(self.root, self.base_domain)
        self.conf.write_text(NGINX_CONF.format(root=self.root, http_port=self.http_port,
                                               https_port=self.https_port, cert=self.cert,
                                               key=self.key))
        subprocess.run([self.nginx_bin, "-c", str(self.conf), "-e", str(self.root / "error.log")],
                       check=True, capture_output=True)
        return self

    def running(self) -> bool:
        pid_file = self.root / "nginx.pid"
        if not pid_file.exists():
            return False
        try:
            return Path(f"/proc/{int(pid_file.read_text())}").exists()
        except ValueError:
            return False

    def stop(self) -> None:
        if self.running():
            subprocess.run([self.nginx_bin, "-c", str(self.conf), "-e",
                            str(self.root / "error.log"), "-s", "quit"], capture_output=True)

    def settings(self) -> dict[str, str]:
        """The provisioner's settings that point it at this nginx."""
        return {
            "NGINX_CONFIG_DIR": str(self.sites),
            "NGINX_BIN": self.nginx_bin,
            "NGINX_MAIN_CONF": str(self.conf),
            "NGINX_HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
            "NGINX_HTTPS_LISTEN": f"127.0.0.1:{self.https_port}",
            "WILDCARD_SSL_CERT": str(self.cert),
            "WILDCARD_SSL_KEY": str(self.key),
        }


@contextlib.contextmanager
def local_stack(installation_id: str, webhook_secret: str = "whsec_bench"):
    """A throwaway provisioner on this machine (bench/ and the like): its own data dir,
    nginx on loopback ports and Docker network; yields the bound Config. On exit, removes
    the containers labelled with `installation_id` and stops nginx."""
    from provisioner import models
    from provisioner.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        nginx = LocalNginx(root / "nginx", base_domain="bench.test").start()
        try:
            yield models.open_database(load_config({
                "STRIPE_WEBHOOK_SECRET": webhook_secret, "BASE_DOMAIN": "bench.test",
                "PROVISIONER_DATA_DIR": str(root / "data"),
                "CUSTOMER_DATA_ROOT": str(root / "customers"),
                "CONTAINER_NETWORK": "ebuilder_bench", "INSTALLATION_ID": installation_id,
                **nginx.settings()}, env_file=root / "none.env"))
        finally:
            names = subprocess.run(["docker", "ps", "-aq", "--filter",
                                    f"label=ebuilder.installation={installation_id}"],
                                   capture_output=True, text=True).stdout.split()
            if names:
                subprocess.run(["docker", "rm", "-f", *names], capture_output=True)
            nginx.stop()
