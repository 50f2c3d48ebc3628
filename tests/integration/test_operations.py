"""The maintenance commands, sysadmin playbook runs and image upgrades, on real
Docker and nginx, through the `provisioner` CLI as an operator runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from pony.orm import db_session, select

from provisioner import alerts
from provisioner.models import AnsibleRun, HealthCheck, Instance
from provisioner.testing import stripe_events
from tests.integration.conftest import (
    docker,
    https_request,
    inspect,
    poll,
    wait_until_live,
)

PROJECT = Path(__file__).resolve().parents[2]


def store_port(name):
    with db_session:
        return Instance.get(subdomain=name, live=True).port


def provision(service, *names):
    for name in names:
        for evt in stripe_events.signup(subdomain=name, site_name=name.title(),
                                        email=f"{name}@example.com"):
            service.post_event(evt)
    for name in names:
        wait_until_live(name)


def instance_id(name):
    with db_session:
        return Instance.get(subdomain=name, live=True).id


def test_health_restarts_an_unhealthy_store_once_then_alerts(service):
    provision(service, "sick-shop", "well-shop")
    started = inspect("ebuilder_sick-shop")["State"]["StartedAt"]
    # Broken in a way a restart fixes: its health page disappears.
    docker("exec", "ebuilder_sick-shop", "rm", "/www/health/index.html")
    result = service.cli("health")
    print(f"\n{result.stdout}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "sick-shop: unhealthy: container running, HTTP 404 -> restart" in result.stdout
    assert re.search(r"health: 1 healthy, 1 unhealthy, 1 restarted in [\d.]+ s", result.stdout)
    assert inspect("ebuilder_sick-shop")["State"]["StartedAt"] != started
    assert https_request(service.nginx, "sick-shop.stores.test", "/health/")[0] == 200

    # Broken in a way a restart does not fix: one store_down incident, one alert email
    # (sent by alert delivery, which `serve` runs every 20 s: here, by the poll).
    data_dir = service.config.customer_data_root / str(instance_id("sick-shop"))
    (data_dir / "db" / "unhealthy").write_text("on purpose")
    docker("restart", "ebuilder_sick-shop")
    marker = b"ALERT store sick-shop: store down"
    alerts_before = sum(marker in m for m in service.smtp.messages)
    for _ in range(3):
        assert service.cli("health").returncode == 1
    assert service.cli("health").returncode == 1
    with db_session:
        instance = Instance.get(subdomain="sick-shop", live=True)
        assert instance.health_failures == 4
        assert "unhealthy 4 times in a row" in instance.status_message
        actions = [h.action for h in instance.health_checks.order_by(HealthCheck.id)]
    assert actions[-4:] == ["restart", None, "alert", "alert"]
    poll(lambda: alerts.deliver_due(service.config) >= 0
         and sum(marker in m for m in service.smtp.messages) == alerts_before + 1,
         timeout=30, what="one alert email")
    alerts.deliver_due(service.config)
    assert sum(marker in m for m in service.smtp.messages) == alerts_before + 1, \
        "the incident was told twice"
    assert service.smtp.messages[-1].count(b"ops@example.com") >= 1


def test_sync_brings_back_a_removed_container_and_reports_strangers(service):
    provision(service, "gone-shop")
    docker("rm", "-f", "ebuilder_gone-shop")
    docker("run", "-d", "--name", "ebuilder_stranger", "--label", "ebuilder.managed=true",
           "--label", f"ebuilder.installation={service.config.installation_id}",
           "-e", "SECRET_KEY=x", "-e", "ALLOWED_HOSTS=x", "-e", "ADMIN_EMAIL=a@b.c",
           "-e", "ADMIN_PASSWORD=p", "ebuilder-standin:latest")
    result = service.cli("sync")
    print(f"\n{result.stdout}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gone-shop: container missing -> converge queued" in result.stdout
    assert "ebuilder_stranger on localhost: ours by label, unknown to the DB (running)" \
        in result.stdout
    poll(lambda: inspect("ebuilder_gone-shop")["State"]["Running"], timeout=60,
         what="the store's container back")
    assert https_request(service.nginx, "gone-shop.stores.test", "/health/")[0] == 200

    # cleanup removes a stranger only once it is stopped.
    assert "removed" not in service.cli("cleanup").stdout
    docker("stop", "ebuilder_stranger")
    result = service.cli("cleanup")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "removed stopped orphan ebuilder_stranger on localhost" in result.stdout
    assert subprocess.run(["docker", "inspect", "ebuilder_stranger"],
                          capture_output=True).returncode != 0


def test_nginx_rewrites_every_vhost_with_one_test_and_one_reload(service):
    provision(service, "page-one", "page-two")
    customer = None
    with db_session:
        subscription = Instance.get(subdomain="page-two", live=True).subscription
        customer, sub_id = subscription.stripe_customer_id, subscription.stripe_id
    sub = stripe_events.resource("subscription")
    sub.update({"id": sub_id, "customer": customer, "status": "unpaid", "cancel_at": None,
                "canceled_at": None, "ended_at": None})
    service.post_event(stripe_events.event("customer.subscription.updated", sub))
    poll(lambda: https_request(service.nginx, "page-two.stores.test", "/")[0] == 503,
         timeout=60, what="page-two suspended")
    for vhost in service.nginx.sites.glob("*.conf"):
        vhost.unlink()
    started = time.perf_counter()
    result = service.cli("nginx")
    elapsed = time.perf_counter() - started
    print(f"\n{result.stdout}nginx regeneration of 2 stores: {elapsed:.2f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nginx: 2 vhosts, 2 changed" in result.stdout
    assert https_request(service.nginx, "page-one.stores.test", "/health/")[0] == 200
    status, body = https_request(service.nginx, "page-two.stores.test", "/")
    assert status == 503 and b"suspended" in body
    with db_session:
        run = select(r for r in AnsibleRun if r.playbook == "nginx.yml").order_by(
            lambda r: -r.id).first()
        stdout = (Path(run.artifact_dir) / "stdout").read_text()
    assert stdout.count("TASK [nginx_site : Test the whole nginx configuration.]") == 1
    assert stdout.count("TASK [nginx_site : Reload nginx.]") == 1


def test_stats_table_and_json(service):
    provision(service, "stats-shop")
    result = service.cli("stats", "--json")
    assert result.returncode == 0
    stats = json.loads(result.stdout)
    assert stats["instances_by_status"]["running"] >= 1
    table = service.cli("stats").stdout
    assert re.search(r"stores running\s+\d+", table) and "MRR" in table


def sysadmin(service, *args):
    """ansible-playbook / ansible-inventory as a sysadmin runs them, with the DB inventory."""
    bin_dir = Path(sys.executable).parent
    settings = PROJECT / "test-artifacts" / "group_vars.yml"
    settings.parent.mkdir(exist_ok=True)
    written = service.cli("ansible-vars")
    assert written.returncode == 0, written.stderr
    settings.write_text(written.stdout)
    command = [str(bin_dir / args[0]), "-i", "inventory", *args[1:]]
    if args[0] == "ansible-playbook":
        command += ["-e", f"@{settings}"]
    return subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600,
                          env={**service.env, "PATH": f"{bin_dir}:{service.env['PATH']}",
                               "ANSIBLE_NOCOLOR": "1"})


def recap(output: str, host: str) -> dict:
    line = next(ln for ln in output.splitlines() if ln.startswith(host + " ") and "ok=" in ln)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def test_sysadmin_sees_stores_in_the_inventory_and_runs_the_same_playbooks(service):
    provision(service, "admin-run", "other-run")
    listing = sysadmin(service, "ansible-inventory", "--list")
    assert listing.returncode == 0, listing.stderr
    inventory = json.loads(listing.stdout)
    assert {"admin-run", "other-run"} <= set(inventory["stores"]["hosts"])
    store = inventory["_meta"]["hostvars"]["admin-run"]["provisioner_store"]
    # Every string is marked unsafe (data, never a template).
    assert (store["name"], store["state"], store["port"]) == \
        ({"__ansible_unsafe": "admin-run"}, {"__ansible_unsafe": "running"},
         store_port("admin-run"))
    assert "password" not in listing.stdout.lower()

    again = sysadmin(service, "ansible-playbook", "playbooks/provision.yml", "--limit",
                     "admin-run")
    assert again.returncode == 0, again.stdout[-2000:]
    assert recap(again.stdout, "admin-run")["changed"] == 0
    assert "other-run" not in again.stdout

    stopped = sysadmin(service, "ansible-playbook", "playbooks/stop.yml", "--limit", "admin-run")
    assert stopped.returncode == 0, stopped.stdout[-2000:]
    assert not inspect("ebuilder_admin-run")["State"]["Running"]
    assert inspect("ebuilder_other-run")["State"]["Running"]
    started = sysadmin(service, "ansible-playbook", "playbooks/start.yml", "--limit", "admin-run")
    assert started.returncode == 0, started.stdout[-2000:]
    assert inspect("ebuilder_admin-run")["State"]["Running"]
    synced = sysadmin(service, "ansible-playbook", "playbooks/sync.yml")
    assert synced.returncode == 0, synced.stdout[-2000:]
    assert recap(synced.stdout, "admin-run")["changed"] == 0
    health = sysadmin(service, "ansible-playbook", "playbooks/health.yml")
    assert health.returncode == 0, health.stdout[-2000:]
    assert re.search(r'"msg": "(\d+) of \1 stores healthy"', health.stdout), health.stdout[-2000:]


def test_upgrade_rolls_out_in_batches_and_rolls_back_an_unhealthy_image(service, tmp_path):
    provision(service, "up-one", "up-two")
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "Dockerfile").write_text("FROM ebuilder-standin:latest\nLABEL v=2\n")
    docker("build", "-q", "-t", "ebuilder-standin:v2", str(tmp_path / "good"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "Dockerfile").write_text(
        "FROM ebuilder-standin:latest\nENV STANDIN_UNHEALTHY=1\n")
    docker("build", "-q", "-t", "ebuilder-standin:broken", str(tmp_path / "bad"))

    result = service.cli("upgrade", "--image", "ebuilder-standin:v2", "--batch", "1")
    print(f"\n{result.stdout}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "upgrade: 2 to upgrade, 2 upgraded" in result.stdout
    for name in ("up-one", "up-two"):
        assert inspect(f"ebuilder_{name}")["Config"]["Image"] == "ebuilder-standin:v2"
        assert https_request(service.nginx, f"{name}.stores.test", "/health/")[0] == 200

    result = service.cli("upgrade", "--image", "ebuilder-standin:broken", "--batch", "1")
    print(result.stdout)
    assert result.returncode == 1
    assert "rolled back to ebuilder-standin:v2" in result.stdout
    assert "1 not attempted" in result.stdout
    images = {name: inspect(f"ebuilder_{name}")["Config"]["Image"] for name in ("up-one", "up-two")}
    assert images == {"up-one": "ebuilder-standin:v2", "up-two": "ebuilder-standin:v2"}
    for name in ("up-one", "up-two"):
        assert https_request(service.nginx, f"{name}.stores.test", "/health/")[0] == 200
