"""`provisioner check-config`, the example env file, the systemd units and the nginx vhost
of deploy/: real files in temporary directories, the real command, nginx and systemd's
own checker where they are installed."""

from __future__ import annotations

import configparser
import http.client
import http.server
import os
import re
import shlex
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from provisioner import cli, env_file
from provisioner.config import SYSTEM_ENV_FILE
from provisioner.settings import REQUIRED, SETTINGS
from provisioner.testing.stack import free_port, make_wildcard_cert, wait_for_port
from provisioner.web.common import MAX_BODY_BYTES

ROOT = Path(__file__).resolve().parents[1]
INSTALL_DIR = "/opt/ebuilder-provisioner"
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
EXAMPLE = ROOT / "deploy" / "ebuilder-provisioner.env.example"
VHOST = ROOT / "deploy" / "nginx" / "ebuilder-provisioner.conf"
DOCS = ROOT / "docs" / "deployment.md"
NAME = "provisioner.stores.example.com"

GOOD = """\
# The settings of a production install.
STRIPE_WEBHOOK_SECRET=whsec_good_0123456789
STRIPE_SECRET_KEY=sk_live_good_0123456789
BASE_DOMAIN=stores.example.com
PROVISIONER_PUBLIC_URL=https://provisioner.stores.example.com
TRUSTED_PROXIES=127.0.0.1
DEFAULT_FROM_EMAIL=eBuilder <noreply@stores.example.com>
EMAIL_HOST="smtp.example.com"
PROVISIONER_ADMIN_PASSWORD='a long admin password'
ANSIBLE_HOST_KEY_CHECKING=false
"""


def write(tmp_path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "provisioner.env"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    path.chmod(mode)
    return path


def check(path: Path) -> list[str]:
    """The check of `path` alone (no units' file on this machine to compare with)."""
    return env_file.check(path, units_file=path.parent / "no-units.env")


def run_cli(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    code = cli.main(["check-config", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_a_good_file_is_ok(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert run_cli(capsys, "--env-file", str(path)) == (0, [f"{path}: ok"], [])


def test_the_default_file_is_the_one_commands_read(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, GOOD.replace("BASE_DOMAIN=stores.example.com\n", ""))
    monkeypatch.setenv("PROVISIONER_ENV_FILE", str(path))
    assert run_cli(capsys) == (1, [], [f"{path}: BASE_DOMAIN is required but not set"])


def test_the_installed_command_exits_1_with_one_line_per_problem(tmp_path):
    path = write(tmp_path, GOOD + "EMAIL_PORT=abc\nSTRIPE_SECERT_KEY=sk_live_x\n", 0o640)
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "provisioner"), "check-config",
                             "--env-file", str(path)], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "PROVISIONER_ENV_FILE": str(path)},
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}: mode 0640: group or others may read it and it holds secrets: "
        f"chmod 600 {path}",
        f"{path}:11: EMAIL_PORT must be an integer, got 'abc'",
        f"{path}:12: STRIPE_SECERT_KEY is not a setting: did you mean STRIPE_SECRET_KEY?"]


LAST = GOOD.count("\n") + 1  # the line a mistake appended to GOOD is on

MISTAKES = [
    ("STRIPE_SECERT_KEY=sk_live_x\n",
     [(LAST, "STRIPE_SECERT_KEY is not a setting: did you mean STRIPE_SECRET_KEY?")]),
    ("email_port=25\n", [(LAST, "email_port is not a setting: did you mean EMAIL_PORT?")]),
    ("SHOP_COLOUR=blue\n",
     [(LAST, "SHOP_COLOUR is not a setting (`provisioner settings` lists them)")]),
    ("export EMAIL_PORT=2525\n",
     [(LAST, "`export` is shell syntax: systemd ignores this line (write KEY=VALUE)")]),
    ("EMAIL_PORT 2525\n", [(LAST, "no `=` on this line: systemd ignores it")]),
    ("EMAIL PORT=2525\n", [(LAST, "the name before `=` is not a variable name (letters, "
                                  "digits, `_`): systemd ignores this line")]),
    ("EMAIL_PORT=abc\n", [(LAST, "EMAIL_PORT must be an integer, got 'abc'")]),
    ("EMAIL_PORT=25\nEMAIL_PORT=587\n",
     [(LAST + 1, "EMAIL_PORT again (first on line 11): the last one wins")]),
    ("PORT_RANGE_START=9500\nPORT_RANGE_END=9400\n",  # load_config's own cross-check
     [(None, "PORT_RANGE_END (9400) must not be below PORT_RANGE_START (9500)")]),
    ('EMAIL_HOST_USER="ops\n', [(LAST, "a quote opened here is never closed")]),
    ("EMAIL_HOST_USER=ops\\\n@example.com\n",
     [(LAST, "EMAIL_HOST_USER: the value runs onto the next line (a quote left open, or a "
             "trailing `\\`)")]),
    ("EMAIL_HOST_USER=o\\ps\n",
     [(LAST, "EMAIL_HOST_USER: systemd and `provisioner` commands read this value "
             "differently: write it bare, or inside one pair of quotes, with no backslash")]),
    ("EMAIL_HOST_USER=ops # the SMTP login\n",
     [(LAST, "EMAIL_HOST_USER: `#` after a value is part of the value: put comments on lines "
             "of their own")]),
    ("; a comment\n",
     [(LAST, "`;` starts a comment for systemd, not for `provisioner` commands: use `#`")]),
    ("# SMTP \\\nEMAIL_PORT=587\n",
     [(LAST, "a comment ending in `\\`: systemd before version 254 reads the next line as "
             "comment too")]),
    ("PROVISIONER_ENV_FILE=/etc/other.env\n",
     [(LAST, "PROVISIONER_ENV_FILE names this file: set it in the unit or the shell, not "
             "inside it")]),
    ("DATABASE_URL=mysql://db/provisioner\n",
     [(LAST, "DATABASE_URL must be sqlite:///path or postgresql://...")]),
    ("DATABASE_URL=postgresql://db.internal/\n",
     [(LAST, "DATABASE_URL names no database: postgresql://user@host/NAME")]),
    ("PROVISIONER_INVENTORY=/nonexistent/hosts.yml\n",
     [(LAST, "the Docker hosts' inventory /nonexistent/hosts.yml is not a file "
             "(PROVISIONER_INVENTORY)")]),
    ("ACME_CA_BUNDLE=/nonexistent/ca.pem\n",
     [(LAST, "ACME_CA_BUNDLE /nonexistent/ca.pem is not a file")]),
    ("PLANS_FILE=plans.toml\n",
     [(LAST, "PLANS_FILE is a relative path: the units would look for it in their "
             "WorkingDirectory, a command in its own directory: make it absolute"),
      (LAST, "PLANS_FILE plans.toml: No such file or directory")]),
]


@pytest.mark.parametrize("added, expected", MISTAKES, ids=[m[0][:24] for m in MISTAKES])
def test_each_mistake_gives_its_line(tmp_path, monkeypatch, added, expected):
    monkeypatch.chdir(tmp_path)  # relative paths are looked for here: nothing there
    path = write(tmp_path, GOOD + added)
    assert check(path) == [f"{path}:{line}: {text}" if line else f"{path}: {text}"
                           for line, text in expected]


@pytest.mark.parametrize("good, bad, expected", [
    ("BASE_DOMAIN=stores.example.com\n", "", "BASE_DOMAIN is required but not set"),
    ("TRUSTED_PROXIES=127.0.0.1\n", "",
     "5: PROVISIONER_PUBLIC_URL is https (a proxy such as nginx is in front) but "
     "TRUSTED_PROXIES is empty: every client would count as the proxy for rate limits and "
     "login throttling"),
    ("https://provisioner.stores.example.com", "http://127.0.0.1:8000",
     "5: PROVISIONER_PUBLIC_URL is this machine's loopback address while a proxy is in front "
     "(TRUSTED_PROXIES): the links in emails and Stripe's return pages would lead nowhere; "
     "set it to the proxy's https:// URL"),
])
def test_settings_that_do_not_go_together(tmp_path, good, bad, expected):
    path = write(tmp_path, GOOD.replace(good, bad))
    assert check(path) == [f"{path}:{expected}" if expected[0].isdigit()
                           else f"{path}: {expected}"]


def test_a_bad_plans_file_is_refused_as_start_up_refuses_it(tmp_path):
    plans = tmp_path / "plans.toml"
    plans.write_text('[[plan]]\nkey = "solo"\n')
    path = write(tmp_path, GOOD + f"PLANS_FILE={plans}\n")
    assert check(path) == [f"{path}:{LAST}: {plans}: plan 1: name is required"]


def test_not_utf8_is_refused(tmp_path):
    path = write(tmp_path, GOOD.encode() + b"EMAIL_HOST_USER=caf\xe9\n")
    assert check(path) == [
        f"{path}: not UTF-8: `provisioner` commands cannot read it",
        f"{path}:{LAST}: EMAIL_HOST_USER: not UTF-8: systemd refuses to start the unit"]


def test_the_file_must_be_root_s_alone(tmp_path):
    path = write(tmp_path, GOOD, mode=0o644)
    assert check(path) == [f"{path}: mode 0644: group or others may read it and it holds "
                           f"secrets: chmod 600 {path}"]
    if os.getuid() != 0:
        pytest.skip("changing a file's owner needs root")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    assert check(path) == [f"{path}: owned by uid 65534: only root (the units' user) should "
                           f"be able to change it: chown root:root {path}"]


def test_a_missing_file_is_one_line(tmp_path):
    path = tmp_path / "absent.env"
    [line] = check(path)
    assert line.startswith(f"{path}: cannot read it (No such file or directory)")


def test_a_dot_env_that_commands_would_read_instead_is_reported(tmp_path, monkeypatch):
    units_file = write(tmp_path, GOOD)
    here = tmp_path / "elsewhere"
    here.mkdir()
    (here / ".env").write_text(GOOD)
    monkeypatch.chdir(here)
    monkeypatch.delenv("PROVISIONER_ENV_FILE", raising=False)
    assert env_file.check(units_file, units_file=units_file) == [
        f"{units_file}: `provisioner` commands run from here read .env, not {units_file} "
        "(the units' file): remove it, or set PROVISIONER_ENV_FILE"]
    monkeypatch.setenv("PROVISIONER_ENV_FILE", str(units_file))
    assert env_file.check(units_file, units_file=units_file) == []


def test_secret_values_are_never_printed(tmp_path, capsys):
    secrets = {"STRIPE_WEBHOOK_SECRET": "whsec_s3cr3t-0123456789",
               "STRIPE_SECRET_KEY": "pk_live_0123456789abcdef",
               "ALERT_WEBHOOKS": "slack:ftp://hooks.example.com/T0/B0/topsecret987",
               "DATABASE_URL": "postgres://admin:hunter2hunter2@db.internal/",
               "EMAIL_HOST_PASSWORD": "pass\\word-0123456789"}
    text = "".join(f"{k}={v}\n" for k, v in secrets.items()) + "BASE_DOMAIN=x.example\n"
    path = write(tmp_path, text)
    code, out, err = run_cli(capsys, "--env-file", str(path))
    assert code == 1 and out == []
    assert err == [
        f"{path}:2: STRIPE_SECRET_KEY must start with sk_ or rk_",
        f"{path}:3: ALERT_WEBHOOKS: '********' is not an http(s) URL (optionally prefixed "
        "slack:)",
        f"{path}:4: DATABASE_URL names no database: postgresql://user@host/NAME",
        f"{path}:5: EMAIL_HOST_PASSWORD: systemd and `provisioner` commands read this value "
        "differently: write it bare, or inside one pair of quotes, with no backslash"]
    printed = "\n".join(err)
    for value in ["topsecret987", "hunter2hunter2", "0123456789", *secrets.values()]:
        assert value not in printed


def test_parse_reads_values_as_systemd_does():
    parsed = env_file.parse(
        "A=plain value  \n"
        "  B = 'single # quoted'\n"
        'C="x\\"y\\z"\n'
        "D='a'\"b\"c\n"
        "E=one\\\n two\n"
        "F=\n"
        "# G=commented\n"
        "H=last")
    assert parsed.values() == {"A": "plain value", "B": "single # quoted", "C": 'x"y\\z',
                               "D": "abc", "E": "one two", "F": "", "H": "last"}
    assert [a.line for a in parsed.assignments] == [1, 2, 3, 4, 5, 7, 9]


def test_the_example_file_is_made_from_the_settings():
    assert EXAMPLE.read_text() == env_file.example_text(), (
        "regenerate: .venv/bin/python -m provisioner.env_file > "
        "deploy/ebuilder-provisioner.env.example")
    parsed = env_file.parse(EXAMPLE.read_text())
    assert parsed.problems == []
    names = {s.env for s in SETTINGS}
    set_here = [a.key for a in parsed.assignments]
    commented = re.findall(r"^#([A-Z][A-Z0-9_]*)=", EXAMPLE.read_text(), re.MULTILINE)
    assert set(set_here) <= names and set(commented) <= names
    assert {s.env for s in SETTINGS if s.default is REQUIRED} <= set(set_here)
    assert sorted(set_here + commented) == sorted(names)  # each setting once


def test_the_example_passes_once_its_placeholders_are_filled(tmp_path, capsys):
    path = write(tmp_path, EXAMPLE.read_text())
    code, _, err = run_cli(capsys, "--env-file", str(path))
    assert code == 1 and sorted(err) == sorted(
        [f"{path}:{line}: {name} is required but not set"
         for line, name in _lines_of(path, "STRIPE_WEBHOOK_SECRET", "BASE_DOMAIN")])
    filled = EXAMPLE.read_text().replace(
        "\nSTRIPE_WEBHOOK_SECRET=\n", "\nSTRIPE_WEBHOOK_SECRET=whsec_0123456789\n").replace(
        "\nBASE_DOMAIN=\n", "\nBASE_DOMAIN=stores.example.com\n")
    path = write(tmp_path, filled)
    code, _, err = run_cli(capsys, "--env-file", str(path))
    [(line, _)] = _lines_of(path, "PROVISIONER_PUBLIC_URL")
    assert (code, err) == (1, [
        f"{path}:{line}: PROVISIONER_PUBLIC_URL is this machine's loopback address while a "
        "proxy is in front (TRUSTED_PROXIES): the links in emails and Stripe's return pages "
        "would lead nowhere; set it to the proxy's https:// URL"])
    path = write(tmp_path, filled.replace("\nPROVISIONER_PUBLIC_URL=\n",
                                          f"\nPROVISIONER_PUBLIC_URL=https://{NAME}\n"))
    assert run_cli(capsys, "--env-file", str(path)) == (0, [f"{path}: ok"], [])


def _lines_of(path: Path, *names: str) -> list[tuple[int, str]]:
    """Where the example leaves each of `names` empty (NAME= on a line of its own)."""
    lines = path.read_text().splitlines()
    return [(lines.index(f"{name}=") + 1, name) for name in names]


# --- The systemd units ---------------------------------------------------------------


def unit(path: Path) -> configparser.ConfigParser:
    parsed = configparser.ConfigParser(interpolation=None, strict=False)
    parsed.optionxform = str
    parsed.read_string(path.read_text())
    return parsed


def test_the_units_run_real_commands_with_the_documented_env_file():
    assert [u.name for u in UNITS] == ["ebuilder-provisioner-web.service",
                                       "ebuilder-provisioner-worker.service",
                                       "ebuilder-provisioner.service"]
    docs = DOCS.read_text()
    assert INSTALL_DIR in docs and str(SYSTEM_ENV_FILE) in docs
    assert str(SYSTEM_ENV_FILE) in EXAMPLE.read_text()
    commands = {}
    for path in UNITS:
        service = unit(path)["Service"]
        assert service["WorkingDirectory"] == INSTALL_DIR
        assert service["EnvironmentFile"] == str(SYSTEM_ENV_FILE)
        assert service["Environment"] == f"PROVISIONER_ENV_FILE={SYSTEM_ENV_FILE}"
        binary, *args = shlex.split(service["ExecStart"])
        assert binary == f"{INSTALL_DIR}/.venv/bin/provisioner"
        here = ROOT / Path(binary).relative_to(INSTALL_DIR)
        shown = subprocess.run([str(here), *args, "--help"], capture_output=True, text=True,
                               timeout=60)
        assert shown.returncode == 0, shown.stderr
        # --help wins over an unknown option: each option must be in the help it printed.
        for option in (a for a in args if a.startswith("--")):
            assert option in shown.stdout, f"{path.name}: {option} is no option of {args[0]}"
        commands[path.name] = args
        assert path.name in docs
    assert commands == {
        "ebuilder-provisioner.service": ["serve", "--host", "127.0.0.1", "--port", "8000"],
        "ebuilder-provisioner-web.service": ["serve", "--no-worker", "--host", "127.0.0.1",
                                             "--port", "8000"],
        "ebuilder-provisioner-worker.service": ["worker"]}


def test_the_units_stop_the_way_the_service_expects():
    grace = next(s.default for s in SETTINGS if s.env == "STOP_GRACE_SECONDS")
    for path in UNITS:
        service = unit(path)["Service"]
        assert service["KillMode"] == "mixed"  # SIGTERM to the main process alone
        # serve waits STOP_GRACE_SECONDS + 30 for its worker (worker_process.supervise).
        assert int(service["TimeoutStopSec"]) > grace + 30
        assert service["RestartPreventExitStatus"] == "2"  # cli: a configuration error
        assert "ProtectHome" not in service  # Ansible's ~/.ansible and SSH keys under /root
    one, web = (unit(ROOT / "deploy" / "systemd" / name)["Unit"] for name in
                ("ebuilder-provisioner.service", "ebuilder-provisioner-web.service"))
    assert one["Conflicts"] == "ebuilder-provisioner-web.service"
    assert web["Conflicts"] == "ebuilder-provisioner.service"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze here")
def test_systemd_accepts_the_units(tmp_path):
    copies = []
    for path in UNITS:  # the checkout stands in for /opt/ebuilder-provisioner
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace(INSTALL_DIR, str(ROOT)))
        copies.append(str(copy))
    result = subprocess.run(["systemd-analyze", "verify", *copies], capture_output=True,
                            text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not [line for line in output.splitlines() if "ebuilder-provisioner" in line], output


# --- The nginx vhost ---------------------------------------------------------------

MAIN_CONF = """\
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    include {root}/ebuilder-provisioner.conf;
}}
"""


def nginx_prefix(root: Path, **replace: str) -> Path:
    """A prefix for nginx with the vhost, its certificate paths (and `replace`'s strings)
    pointed at throwaway files; each replaced string must be in the vhost once."""
    (root / "tmp").mkdir(parents=True)
    cert, key = make_wildcard_cert(root, "stores.example.com")
    vhost = VHOST.read_text()
    for old, new in {"/etc/ssl/certs/wildcard.pem": str(cert),
                     "/etc/ssl/private/wildcard.key": str(key), **replace}.items():
        assert vhost.count(old) == 1, old
        vhost = vhost.replace(old, new)
    (root / "ebuilder-provisioner.conf").write_text(vhost)
    conf = root / "nginx.conf"
    conf.write_text(MAIN_CONF.format(root=root))
    return conf


def nginx(conf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nginx", "-p", str(conf.parent), "-c", str(conf), "-e",
                           str(conf.parent / "error.log"), *args], capture_output=True,
                          text=True, timeout=30)


needs_nginx = pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed")


@needs_nginx
def test_nginx_accepts_the_vhost(tmp_path):
    result = nginx(nginx_prefix(tmp_path), "-t")
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_the_vhost_matches_the_service():
    vhost = VHOST.read_text()
    size = re.search(r"client_max_body_size (\d+)k;", vhost)
    assert size and int(size.group(1)) * 1024 == MAX_BODY_BYTES
    assert re.search(r"server 127\.0\.0\.1:8000;", vhost)  # the units' --host and --port
    assert vhost.count(f"server_name {NAME};") == 2
    assert f"PROVISIONER_PUBLIC_URL=https://{NAME}" in vhost


class _Upstream(http.server.ThreadingHTTPServer):
    """Stands where `serve` listens: records what nginx passed on."""

    def __init__(self):
        self.seen: list[tuple[str, str, dict, int]] = []
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                upstream.seen.append((self.command, self.path, dict(self.headers), length))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@needs_nginx
def test_the_vhost_passes_requests_on_as_the_service_reads_them(tmp_path):
    upstream = _Upstream()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    http_port, https_port = free_port(), free_port()
    conf = nginx_prefix(tmp_path, **{
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream.server_address[1]};"})
    started = nginx(conf)
    assert started.returncode == 0, started.stderr
    try:
        wait_for_port(https_port)
        plain = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        plain.request("GET", "/admin/?page=2", headers={"Host": NAME})
        answer = plain.getresponse()
        assert (answer.status, answer.getheader("Location")) == \
            (301, f"https://{NAME}/admin/?page=2")
        answer.read()
        plain.request("GET", "/.well-known/acme-challenge/tok3n", headers={"Host": NAME})
        assert plain.getresponse().status == 200
        assert upstream.seen.pop()[:2] == ("GET", "/.well-known/acme-challenge/tok3n")

        def tls(method: str, path: str, body: bytes = b"", **headers: str):
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            connection = http.client.HTTPSConnection("127.0.0.1", https_port, timeout=10,
                                                     context=context)
            connection.request(method, path, body=body, headers={"Host": NAME, **headers})
            answer = connection.getresponse()
            answer.read()
            return answer

        answer = tls("POST", "/api/webhook/stripe/", b"{" + b" " * 10_000 + b"}",
                     **{"Content-Type": "application/json", "X-Forwarded-For": "203.0.113.9",
                        "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"})
        assert answer.status == 200
        assert answer.getheader("Strict-Transport-Security") == "max-age=31536000"
        method, path, headers, length = upstream.seen.pop()
        assert (method, path, length) == ("POST", "/api/webhook/stripe/", 10_002)
        assert headers["Host"] == NAME and headers["X-Forwarded-Host"] == NAME
        assert headers["X-Forwarded-Proto"] == "https"
        # The client's hop first, nginx's peer (the service's trusted proxy) last.
        assert headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
        assert tls("POST", "/api/webhook/stripe/", b"x" * (MAX_BODY_BYTES + 1)).status == 413
        assert upstream.seen == []
        assert tls("GET", "/account/s1gned-l1nk/").status == 200
        assert upstream.seen.pop()[1] == "/account/s1gned-l1nk/"
        log = (tmp_path / "access.log").read_text()
        assert "/api/webhook/stripe/" in log and "s1gned-l1nk" not in log
    finally:
        nginx(conf, "-s", "stop")
        upstream.shutdown()

