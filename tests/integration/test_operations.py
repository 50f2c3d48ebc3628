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
from provisioner.models import AnsibleRun, HealthCheck, Instance, Job
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


def test_sync_check_reports_drift_then_sync_converges_it(service):
    provision(service, "gone-shop", "drift-shop")
    docker("rm", "-f", "ebuilder_gone-shop")
    docker("stop", "ebuilder_drift-shop")
    vhost = service.nginx.sites / "drift-shop.stores.test.conf"
    vhost.unlink()
    ghost = service.nginx.sites / "ghost-shop.stores.test.conf"
    ghost.write_text(f"# ebuilder-installation: {service.config.installation_id}\n"
                     f"# eBuilder store ghost-shop.stores.test (present)\n")
    docker("run", "-d", "--name", "ebuilder_stranger", "--label", "ebuilder.managed=true",
           "--label", f"ebuilder.installation={service.config.installation_id}",
           "-e", "SECRET_KEY=x", "-e", "ALLOWED_HOSTS=x", "-e", "ADMIN_EMAIL=a@b.c",
           "-e", "ADMIN_PASSWORD=p", "ebuilder-standin:latest")
    with db_session:
        jobs_before = Job.select().count()

    check = service.cli("sync", "--check")
    print(f"\n{check.stdout}")
    assert check.returncode == 1, check.stdout + check.stderr
    assert "gone-shop on localhost: container missing" in check.stdout
    assert "drift-shop on localhost: container exited, should be running; vhost missing" \
        in check.stdout
    assert "ebuilder_stranger on localhost: ours by label, unknown to the DB (running)" \
        in check.stdout
    assert f"{ghost} on localhost: vhost of this installation, no live store" in check.stdout
    assert "2 drifted" in check.stdout
    # Nothing was changed or queued.
    with db_session:
        assert Job.select().count() == jobs_before
        assert Instance.get(subdomain="gone-shop", live=True).status == "running"
    assert not vhost.exists() and not inspect("ebuilder_drift-shop")["State"]["Running"]

    result = service.cli("sync")
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gone-shop: container missing -> converge queued" in result.stdout
    assert "ebuilder_stranger on localhost: ours by label, unknown to the DB (running)" \
        in result.stdout
    for name in ("gone-shop", "drift-shop"):
        poll(lambda n=name: inspect(f"ebuilder_{n}")["State"]["Running"], timeout=60,
             what=f"{name}'s container back")
        assert https_request(service.nginx, f"{name}.stores.test", "/health/")[0] == 200
    assert vhost.exists()
    ghost.unlink()
    again = service.cli("sync", "--check")
    assert "2 in step, 0 drifted, 1 unknown" in again.stdout, again.stdout
    assert "gone-shop on" not in again.stdout and "ghost-shop" not in again.stdout

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


def sysadmin(service, command: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    """A README command as a sysadmin types it: the venv activated, in `cwd`, with the
    service's settings in the environment."""
    activate = Path(sys.prefix) / "bin" / "activate"
    return subprocess.run(["bash", "-c", f"source {activate} && {command}"], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**service.env, "ANSIBLE_NOCOLOR": "1", "USER": "sysadmin-sam",
                               **env})


def recap(output: str, host: str) -> dict:
    line = next(ln for ln in output.splitlines() if ln.startswith(host + " ") and "ok=" in ln)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def test_sysadmin_runs_from_any_directory_are_recorded_and_not_undone(service, tmp_path):
    """The README's sysadmin commands, typed in another directory: the DB inventory with
    the service's settings, and runs the service keeps and respects."""
    provision(service, "admin-run", "other-run")
    listing = sysadmin(service, "ansible-inventory --list", tmp_path)
    assert listing.returncode == 0, listing.stderr
    inventory = json.loads(listing.stdout)
    assert {"admin-run", "other-run"} <= set(inventory["stores"]["hosts"])
    store = inventory["_meta"]["hostvars"]["admin-run"]["provisioner_store"]
    # Every string is marked unsafe (data, never a template).
    assert (store["name"], store["state"], store["port"]) == \
        ({"__ansible_unsafe": "admin-run"}, {"__ansible_unsafe": "running"},
         store_port("admin-run"))
    # The service's settings come with the stores (no hand-made group_vars file).
    assert inventory["_meta"]["hostvars"]["admin-run"]["nginx_site_base_domain"] == \
        {"__ansible_unsafe": "stores.test"}
    assert "password" not in listing.stdout.lower()
    broken = sysadmin(service, "ansible-inventory --list", tmp_path, STRIPE_WEBHOOK_SECRET="")
    assert broken.returncode != 0
    assert "STRIPE_WEBHOOK_SECRET is required but not set" in broken.stderr

    stopped = sysadmin(service, f"ansible-playbook {PROJECT}/playbooks/stop.yml "
                                f"--limit admin-run", tmp_path)
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-2000:]
    assert "provisioner: admin-run: stopped, held against billing" in stopped.stdout
    assert not inspect("ebuilder_admin-run")["State"]["Running"]
    assert inspect("ebuilder_other-run")["State"]["Running"]
    # The service's own sweeps leave the sysadmin's stop alone.
    assert service.cli("health").returncode == 0
    assert service.cli("sync").returncode == 0
    assert not inspect("ebuilder_admin-run")["State"]["Running"]
    with db_session:
        instance = Instance.get(subdomain="admin-run", live=True)
        assert (instance.status, instance.admin_hold) == ("stopped", True)
        run = AnsibleRun.get(playbook="stop.yml")
        assert run.started_by.startswith("sysadmin-sam on ")
    status, page = service.api("GET", f"/admin/instances/{instance.id}/")
    assert status == 200 and "stop.yml run by sysadmin-sam on " in page

    restarted = sysadmin(service, "ansible-playbook -i inventory playbooks/restart.yml "
                                  "--limit admin-run", PROJECT)
    assert restarted.returncode == 0, restarted.stdout[-3000:]
    assert "provisioner: admin-run: running" in restarted.stdout
    assert inspect("ebuilder_admin-run")["State"]["Running"]
    with db_session:
        assert not Instance.get(subdomain="admin-run", live=True).admin_hold
    synced = sysadmin(service, "ansible-playbook -i inventory playbooks/sync.yml", PROJECT)
    assert synced.returncode == 0, synced.stdout[-2000:]
    assert recap(synced.stdout, "admin-run")["changed"] == 0
    health = sysadmin(service, "ansible-playbook -i inventory playbooks/health.yml "
                               "--limit state_running", PROJECT)
    assert health.returncode == 0, health.stdout[-2000:]
    assert re.search(r'"msg": "(\d+) of \1 stores healthy"', health.stdout), health.stdout[-2000:]
    vhosts = sysadmin(service, "ansible-playbook -i inventory playbooks/nginx.yml", PROJECT)
    assert vhosts.returncode == 0, vhosts.stdout[-2000:]

    # "Running the playbooks with explicit stores": the settings and a batch by hand.
    settings = sysadmin(service, "provisioner ansible-vars", tmp_path)
    assert settings.returncode == 0, settings.stderr
    (tmp_path / "settings.yml").write_text(settings.stdout)
    with db_session:
        shop = Instance.get(subdomain="admin-run", live=True)
        (tmp_path / "batch.yml").write_text(json.dumps({"stores": {"hosts": {"admin-run": {
            "provisioner_store": {"name": "admin-run", "instance_id": str(shop.id),
                                  "site_name": shop.site_name, "admin_email": shop.admin_email,
                                  "port": shop.port, "docker_host": "localhost"}}}}}))
    batch = sysadmin(service, f"ansible-playbook -i inventory/hosts.yml -i {tmp_path}/batch.yml "
                              f"playbooks/provision.yml -e @{tmp_path}/settings.yml", PROJECT)
    assert batch.returncode == 0, batch.stdout[-3000:]
    assert recap(batch.stdout, "admin-run")["changed"] == 0

    archive = tmp_path / "other-run-final.tar.gz"
    destroyed = sysadmin(service, f"ansible-playbook -i inventory playbooks/destroy.yml "
                                  f"--limit other-run -e store_archive={archive}", PROJECT)
    assert destroyed.returncode == 0, destroyed.stdout[-3000:]
    assert archive.is_file()
    assert docker("ps", "-aq", "--filter", "name=^ebuilder_other-run$").strip() == ""
    with db_session:
        gone = Instance.select(lambda i: i.subdomain == "other-run").first()
        assert (gone.live, gone.status, gone.archive_path) == (False, "destroyed", str(archive))


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
