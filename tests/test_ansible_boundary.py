"""The Ansible boundary with real ansible-playbook runs on localhost (no Docker):
customer text stays data, and no secret outlives the run or reaches its artifacts."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pony.orm import db_session

from provisioner.ansible.runner import run_playbook, sweep_extravars
from provisioner.models import Instance

PROJECT = Path(__file__).resolve().parents[1]
HOSTILE_NAMES = [
    "{{ lookup('pipe', 'touch MARK') }}",
    "{% for x in range(3) %}{{ lookup('pipe', 'touch MARK') }}{% endfor %}",
    "{{ 7*7 }}",
    "{{ undefined_variable }} & <b>Jane's</b> \"Shop\"",
]
# Writes what each store's role inputs turned into, through the real mapping
# (group_vars/stores.yml) and the real batch registration (stores.yml).
ECHO_PLAYBOOK = """\
- name: Echo the role inputs
  hosts: stores
  gather_facts: false
  tasks:
    - name: Write what the role would get
      ansible.builtin.copy:
        content: "{{ {'site_name': ebuilder_instance_site_name,
                      'admin_email': ebuilder_instance_admin_email,
                      'password': ebuilder_instance_admin_password} | to_json }}"
        dest: "{{ echo_dir }}/{{ inventory_hostname }}.json"
        mode: "0600"
      delegate_to: localhost

    - name: Wait when asked to
      ansible.builtin.command: sleep {{ echo_sleep | default(0) }}
      changed_when: false
"""
@pytest.fixture
def project(ansible_project, tmp_path):
    """The real playbooks and roles beside an echo playbook."""
    (ansible_project.playbooks_dir / "echo.yml").write_text(ECHO_PLAYBOOK)
    (tmp_path / "echo").mkdir()
    return ansible_project


def _stores(names: list[str]) -> list[dict]:
    return [{"name": f"store{n}", "instance_id": str(n), "site_name": name,
             "admin_email": f"{name}@example.com", "port": 19000 + n, "docker_host": "localhost"}
            for n, name in enumerate(names)]


def test_customer_text_reaches_the_role_verbatim_and_never_runs(project, tmp_path,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a relative `touch MARK` would land
    stores = _stores(HOSTILE_NAMES)
    result = run_playbook(project, "echo.yml", stores,
                          {"store0": {"admin_password": "{{ 6*7 }}"}},
                          extra_vars={"echo_dir": str(tmp_path / "echo")})
    assert result.status == "successful", result.hosts
    for store in stores:
        echoed = json.loads((tmp_path / "echo" / f"{store['name']}.json").read_text())
        assert echoed["site_name"] == store["site_name"]
        assert echoed["admin_email"] == store["admin_email"]
    assert json.loads((tmp_path / "echo" / "store0.json").read_text())["password"] == "{{ 6*7 }}"
    assert not list(tmp_path.rglob("MARK")), "a store name ran a command"


def test_no_secret_reaches_the_run_dir(project, tmp_path, monkeypatch):
    service_secrets = {"STRIPE_SECRET_KEY": "sk_test_neverondisk1234",
                       "STRIPE_WEBHOOK_SECRET": "whsec_neverondisk5678",
                       "PROVISIONER_ADMIN_PASSWORD": "admin-neverondisk",
                       "PROVISIONER_ADMIN_TOKEN": "token-neverondisk",
                       "EMAIL_HOST_PASSWORD": "smtp-neverondisk"}
    for name, value in service_secrets.items():
        monkeypatch.setenv(name, value)
    password = "first-boot-neverondisk"
    result = run_playbook(project, "echo.yml", _stores(["plain"]),
                          {"store0": {"admin_password": password}},
                          extra_vars={"echo_dir": str(tmp_path / "echo")})
    assert result.status == "successful"
    run_dir = project.ansible_runs_dir / result.ident
    command = json.loads((result.artifact_dir / "command").read_text())
    assert "PATH" in command["env"] and "STRIPE_SECRET_KEY" not in command["env"]
    assert not (run_dir / "env" / "extravars").exists()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        text = path.read_bytes()
        for value in [*service_secrets.values(), password]:
            assert value.encode() not in text, f"{value} in {path}"
    assert oct(project.ansible_runs_dir.stat().st_mode & 0o777) == "0o700"
    assert oct(run_dir.stat().st_mode & 0o777) == "0o700"


def test_a_killed_run_leaves_no_extravars_behind(project, tmp_path):
    """SIGKILL of the process running ansible: the next run sweeps what it left."""
    script = (
        "import dataclasses, pathlib, sys\n"
        "from provisioner.config import load_config\n"
        "from provisioner.ansible.runner import run_playbook\n"
        f"config = dataclasses.replace(load_config({{'STRIPE_WEBHOOK_SECRET': 'whsec_x',"
        f" 'BASE_DOMAIN': 'stores.test'}}, env_file=pathlib.Path('/nonexistent')),"
        f" project_dir=pathlib.Path({str(project.project_dir)!r}),"
        f" data_dir=pathlib.Path({str(project.data_dir)!r}))\n"
        "run_playbook(config, 'echo.yml', [{'name': 'store0', 'instance_id': '0',"
        " 'site_name': 's', 'admin_email': 'e@x.io', 'port': 1, 'docker_host': 'localhost'}],"
        " {'store0': {'admin_password': 'killed-run-password'}},"
        f" extra_vars={{'echo_dir': {str(tmp_path / 'echo')!r}, 'echo_sleep': 60}})\n")
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not list(project.ansible_runs_dir.glob("*/env/extravars")):
            assert time.monotonic() < deadline, "the run never wrote its extravars"
            assert process.poll() is None, "the run ended early"
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        _kill_orphans(project.project_dir)
    left = list(project.ansible_runs_dir.glob("*/env/extravars"))
    assert left, "killed before ansible read its vars: the file is still there"
    # A child forked at that moment may hold the run's lock until it execs.
    deadline = time.monotonic() + 10
    while sweep_extravars(project) == 0:
        assert time.monotonic() < deadline, "the sweep never removed the killed run's vars"
        time.sleep(0.05)
    assert not list(project.ansible_runs_dir.glob("*/env/extravars"))


def _kill_orphans(project_dir: Path) -> None:
    """ansible-playbook runs in its own session: SIGKILL of its parent leaves it running."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ansible-playbook" in cmdline and str(project_dir).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def test_the_sweep_spares_a_live_run(project):
    run_dir = project.ansible_runs_dir / "provision-live"
    (run_dir / "env").mkdir(parents=True)
    (run_dir / "env" / "extravars").write_text("{}")
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert sweep_extravars(project) == 0
        assert (run_dir / "env" / "extravars").exists()
    finally:
        os.close(fd)
    assert sweep_extravars(project) == 1


def test_the_db_inventory_hands_over_names_as_data(config, base_env, tmp_path):
    """ansible-playbook -i inventory (the DB inventory script), as a sysadmin runs it."""
    hostile = HOSTILE_NAMES[0].replace("MARK", str(tmp_path / "MARK"))
    with db_session:
        Instance(subdomain="inv-shop", site_name=hostile, admin_email="{{ 7*7 }}@example.com",
                 port=19150, docker_host="localhost")
    playbook = tmp_path / "echo.yml"
    playbook.write_text(
        "- name: Echo\n  hosts: stores\n  gather_facts: false\n"
        f"  vars_files: [{PROJECT / 'playbooks' / 'group_vars' / 'stores.yml'}]\n"
        "  tasks:\n    - name: Write\n      ansible.builtin.copy:\n"
        "        content: \"{{ {'site_name': ebuilder_instance_site_name,"
        " 'email': ebuilder_instance_admin_email, 'domain': ebuilder_instance_base_domain,"
        " 'installation': ebuilder_instance_installation_id} | to_json }}\"\n"
        f"        dest: {tmp_path}/{{{{ inventory_hostname }}}}.json\n"
        "        mode: '0600'\n      delegate_to: localhost\n")
    bin_dir = Path(sys.executable).parent
    env = {**base_env, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PROVISIONER_ENV_FILE": str(tmp_path / "none.env"),
           "ANSIBLE_CONFIG": str(PROJECT / "ansible.cfg")}
    result = subprocess.run([str(bin_dir / "ansible-playbook"), "-i", str(PROJECT / "inventory"),
                             str(playbook), "--limit", "inv-shop"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    echoed = json.loads((tmp_path / "inv-shop.json").read_text())
    assert echoed == {"site_name": hostile, "email": "{{ 7*7 }}@example.com",
                      "domain": config.base_domain, "installation": config.installation_id}
    assert not (tmp_path / "MARK").exists()
