"""Pebble (Let's Encrypt's test ACME server, Debian's package) and pebble-challtestsrv as
its DNS, both on free loopback ports with their config in a temporary dir; every name
resolves to 127.0.0.1, so Pebble validates HTTP-01 against the test stack's nginx."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.testing.stack import free_port, wait_for_port


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _server_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and Pebble's own HTTPS certificate for 127.0.0.1 / localhost."""
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "pebble.key", directory / "pebble.csr", directory / "pebble.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
             str(ca_key), "-out", str(ca), "-subj", "/CN=pebble test CA")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=localhost")
    extensions = directory / "san.ext"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(extensions))
    return ca, cert, key


@dataclass
class Pebble:
    directory_url: str
    management_url: str
    ca_bundle: Path
    dns_server: str
    challtestsrv_url: str

    def _get(self, url: str, data: bytes | None = None) -> bytes:
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.read()

    def issuer_pems(self) -> str:
        """Pebble's root and intermediate (made anew at each start), to verify its chains."""
        return (self._get(f"{self.management_url}/roots/0").decode()
                + self._get(f"{self.management_url}/intermediates/0").decode())

    def set_a(self, host: str, addresses: list[str]) -> None:
        """Answer A queries for `host` with `addresses` (instead of 127.0.0.1)."""
        body = json.dumps({"host": host.rstrip(".") + ".", "addresses": addresses}).encode()
        urllib.request.urlopen(urllib.request.Request(  # noqa: S310 (loopback)
            f"{self.challtestsrv_url}/add-a", data=body, method="POST"), timeout=10).read()

    def clear_a(self, host: str) -> None:
        body = json.dumps({"host": host.rstrip(".") + "."}).encode()
        urllib.request.urlopen(urllib.request.Request(  # noqa: S310 (loopback)
            f"{self.challtestsrv_url}/clear-a", data=body, method="POST"), timeout=10).read()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def pebble(tmp_path_factory, nginx):
    """Pebble validating HTTP-01 on the test nginx's HTTP port; names resolve to 127.0.0.1."""
    if shutil.which("pebble") is None or shutil.which("pebble-challtestsrv") is None:
        pytest.fail("Debian's pebble package is not installed: run scripts/setup.sh")
    root = tmp_path_factory.mktemp("pebble")
    ca, cert, key = _server_certificate(root)
    acme_port, management_port = free_port(), free_port()
    dns_port, challtestsrv_port = free_port(), free_port()
    config = root / "pebble-config.json"
    config.write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{acme_port}",
        "managementListenAddress": f"127.0.0.1:{management_port}",
        "certificate": str(cert), "privateKey": str(key),
        "httpPort": nginx.http_port, "tlsPort": free_port(),
        "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
    dns = subprocess.Popen(
        ["pebble-challtestsrv", "-dns01", f"127.0.0.1:{dns_port}", "-http01", "",
         "-https01", "", "-tlsalpn01", "", "-management",
         f"127.0.0.1:{challtestsrv_port}", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
        stdout=(root / "challtestsrv.log").open("wb"), stderr=subprocess.STDOUT)
    server = None
    try:
        wait_for_port(challtestsrv_port, timeout=30)
        server = subprocess.Popen(
            ["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns_port}",
             "-strict=false"],
            env={**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
                 # Every order validated anew: a renewal goes through nginx too.
                 "PEBBLE_AUTHZREUSE": "0"},
            stdout=(root / "pebble.log").open("wb"), stderr=subprocess.STDOUT)
        wait_for_port(acme_port, timeout=30)
        wait_for_port(management_port, timeout=30)
        yield Pebble(directory_url=f"https://127.0.0.1:{acme_port}/dir",
                     management_url=f"https://127.0.0.1:{management_port}",
                     ca_bundle=ca, dns_server=f"127.0.0.1:{dns_port}",
                     challtestsrv_url=f"http://127.0.0.1:{challtestsrv_port}")
    finally:
        if server is not None:
            _stop(server)
        _stop(dns)
