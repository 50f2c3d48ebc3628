"""The one place that calls ansible-runner.

Each run gets its own private data dir under the data dir (0700); its
artifacts (stdout, per-task events, status, rc) are kept as the provisioning
log. The variables go in `env/extravars` (0600, every string marked unsafe so
Ansible never renders customer text as a template); some are secret, so that
file is deleted as soon as ansible-playbook has read it, and a run killed
before that leaves a file that the next run sweeps away (a run holds a lock
on its dir while it lives). The playbook's environment is a minimal one: the
service's own secrets never reach it nor the `command` artifact.

Every run is bounded (`run_timeout_seconds`) and cancellable (the worker's
stop); either way no process of the run outlives it. ansible-playbook runs in
its own session and its forked workers each start another (`os.setsid`), so
ansible-runner, which kills the first one's process group, leaves the workers
and the commands they run alive: they are found by the run dir in their
command line and as their descendants (here after a run, and by
`recording.recover_abandoned_runs` after a crash).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ansible_runner.interface import init_runner

from provisioner.ansible.untrusted import extra_vars_yaml, stores_inventory_yaml
from provisioner.config import Config

log = logging.getLogger(__name__)

EventSink = Callable[[dict], None]


CONFLICT = "conflict:"
# The role would not lower a store's limits below what it uses (plan downgrade).
PLAN_REFUSED = "plan refused:"
CANCELLED = "cancelled:"
TIMEOUT = "timeout"      # ansible-runner's status of a run it ended at its timeout
CANCELED = "canceled"    # ... and of one its cancel callback ended
# In the environment of every process of a run (ansible-playbook, its forked
# workers, the modules and what they start): how one cut off from the tree while
# the run is being ended is still recognised.
RUN_MARK = "PROVISIONER_ANSIBLE_RUN"
# A fact a playbook that judges all its stores in one task sets (health.yml):
# store name -> '' or why it failed. It is each named store's result, whatever
# the host the judging task ran on did afterwards.
OUTCOMES_FACT = "provisioner_outcomes"
# health.yml -e health_measure_disk=true: store name -> MiB its data dir takes.
DISK_USAGE_FACT = "provisioner_disk_usage"
# What a run made for one store, set on that store (backup.yml: the archive's facts).
STORE_RESULT_FACT = "provisioner_store_result"
# How long an ended run's processes get between SIGTERM and SIGKILL.
KILL_GRACE_SECONDS = 5.0
# How often ansible-runner looks at the cancel callback and the timeout while
# ansible-playbook is quiet (its default is 5 s).
POLL_SECONDS = 1


@dataclass
class HostOutcome:
    ok: bool
    changed: int = 0
    error: str | None = None
    # A judging task named this store (OUTCOMES_FACT): its result is a verdict on the
    # store itself, not the run failing around it.
    judged: bool = False

    @property
    def conflict(self) -> bool:
        """The role found something that is not ours where the store should be."""
        return not self.ok and (self.error or "").startswith(CONFLICT)

    @property
    def plan_refused(self) -> bool:
        """The store keeps its old limits: a verdict on the plan, not a failure to retry."""
        return not self.ok and (self.error or "").startswith(PLAN_REFUSED)

    @property
    def cancelled(self) -> bool:
        """The worker stopped the run: the store was not tried to the end, no attempt counts."""
        return not self.ok and (self.error or "").startswith(CANCELLED)


@dataclass
class RunResult:
    ident: str
    playbook: str
    status: str
    rc: int | None
    artifact_dir: Path
    hosts: dict[str, HostOutcome] = field(default_factory=dict)
    # The AnsibleRun row, once recorded.
    run_id: int | None = None
    # DISK_USAGE_FACT, when the run measured it.
    disk_usage: dict[str, float] = field(default_factory=dict)
    # STORE_RESULT_FACT of each store that set it.
    store_results: dict[str, dict] = field(default_factory=dict)

    @property
    def timed_out(self) -> bool:
        return self.status == TIMEOUT

    @property
    def cancelled(self) -> bool:
        return self.status == CANCELED


def settings_vars(config: Config) -> dict:
    """Role inputs that come from the service's configuration."""
    return {
        # Not ebuilder_instance_image: extra vars would beat each store's own image.
        "provisioner_default_image": config.ebuilder_image,
        # Polled 4 times a second (the role's delay): a store is live the moment it answers.
        "ebuilder_instance_health_retries": config.health_wait_seconds * 4,
        # A Docker host's provisioner_data_root / provisioner_backup_root beat these
        # (group_vars/stores.yml); under those names, extra vars would beat every host's.
        "provisioner_default_data_root": str(config.customer_data_root),
        "provisioner_default_backup_root": str(config.backup_root),
        "ebuilder_instance_backup_copy_to": config.backup_copy_to,
        "ebuilder_instance_network": config.container_network,
        "ebuilder_instance_base_domain": config.base_domain,
        "nginx_site_base_domain": config.base_domain,
        "nginx_site_config_dir": str(config.nginx_config_dir),
        "nginx_site_bin": config.nginx_bin,
        "nginx_site_main_conf": config.nginx_main_conf,
        "nginx_site_http_listen": config.nginx_http_listen,
        "nginx_site_https_listen": config.nginx_https_listen,
        "nginx_site_ssl_certificate": config.wildcard_ssl_cert,
        "nginx_site_ssl_certificate_key": config.wildcard_ssl_key,
        "ebuilder_instance_installation_id": config.installation_id,
        "nginx_site_installation_id": config.installation_id,
        # nginx passes ACME's HTTP-01 challenges to this service (web/domains.py).
        "nginx_site_acme_challenge_upstream": config.acme_challenge_upstream or config.public_url,
    }


# What ansible-playbook needs from our environment; everything else (Stripe
# keys, admin credentials, SMTP password, DATABASE_URL) stays behind.
PASSED_ENV = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
                        "TERM", "SSH_AUTH_SOCK", "PYTHONPATH", "VIRTUAL_ENV"})
PASSED_ENV_PREFIXES = ("ANSIBLE_", "LC_", "RUNNER_", "AWX_")


def strategy_env(config: Config) -> dict[str, str]:
    """Mitogen's strategy when it is on and installed: the same playbooks, the same
    results, module calls without a new Python per task (a sysadmin's plain
    `ansible-playbook` keeps Ansible's own `linear`)."""
    if not config.ansible_mitogen:
        return {}
    try:
        import ansible_mitogen
    except ImportError:
        log.warning("ANSIBLE_MITOGEN is on but mitogen is not installed: using linear")
        return {}
    plugins = Path(ansible_mitogen.__file__).parent / "plugins" / "strategy"
    return {"ANSIBLE_STRATEGY_PLUGINS": str(plugins), "ANSIBLE_STRATEGY": "mitogen_linear"}


def minimal_env(runner_env: dict[str, str], process_env: dict[str, str]) -> dict[str, str]:
    """ansible-runner's environment for the playbook, less what it copied from ours."""
    return {name: value for name, value in runner_env.items()
            if name in PASSED_ENV or name.startswith(PASSED_ENV_PREFIXES)
            or process_env.get(name) != value}


def sweep_extravars(config: Config) -> int:
    """Delete extravars that a killed run left behind; return how many."""
    removed = 0
    for extravars in config.ansible_runs_dir.glob("*/env/extravars"):
        run_dir = extravars.parent.parent
        try:
            fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # that run is alive and will delete its own
        else:
            extravars.unlink(missing_ok=True)
            removed += 1
        finally:
            os.close(fd)
    return removed


# A Python exception's last line in a module's traceback ("OSError: [Errno 28] ...").
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?:[A-Z]\w*)?(?:Error|Exception|Exit)\b")


def _error_of(event: dict) -> str:
    res = (event.get("event_data") or {}).get("res") or {}
    if res.get("censored"):
        return res["censored"]
    message = res.get("msg") or res.get("stderr") or res.get("reason") or "failed"
    if str(message).startswith("Module result deserialization failed"):
        # A module that raised instead of failing (Mitogen runs it in-process): its
        # traceback's exceptions say why, the root cause first.
        causes = [line for line in str(res.get("module_stderr") or "").splitlines()
                  if _EXCEPTION_LINE.match(line)]
        if causes:
            message = "module failed: " + " -> ".join(causes)
    return str(message)[:2000]


def new_ident(playbook: str) -> str:
    return f"{playbook.removesuffix('.yml')}-{uuid.uuid4().hex[:12]}"


def artifact_dir(config: Config, ident: str) -> Path:
    return config.ansible_runs_dir / ident / "artifacts" / ident


def _stdout_tail(runner, lines: int = 5) -> str:
    try:
        text = runner.stdout.read()
    except (OSError, AttributeError):
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _private_run_dir(config: Config, ident: str) -> tuple[Path, int]:
    """The run's own 0700 dir, locked for as long as the run lives (see sweep_extravars)."""
    config.ansible_runs_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
    sweep_extravars(config)
    private_dir = config.ansible_runs_dir / ident
    (private_dir / "env").mkdir(parents=True, mode=0o700)
    private_dir.chmod(0o700)
    lock = os.open(private_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return private_dir, lock


def _interruption(config: Config, runner, ident: str) -> str | None:
    """Why the run was ended before its end, as each of its stores' error."""
    if runner.status == TIMEOUT:
        return f"ansible run timed out after {config.run_timeout_seconds} s (run {ident})"
    if runner.status == CANCELED:
        return f"{CANCELLED} the worker stopped during run {ident}"
    return None


def fact_of(event: dict, name: str) -> dict:
    """The dict fact `name` an event sets, or none."""
    if event.get("event") != "runner_on_ok":
        return {}
    res = (event.get("event_data") or {}).get("res") or {}
    value = (res.get("ansible_facts") or {}).get(name)
    return value if isinstance(value, dict) else {}


def outcomes_of(event: dict) -> dict[str, str]:
    """The verdicts an event sets (OUTCOMES_FACT), or none."""
    return {str(k): str(v or "") for k, v in fact_of(event, OUTCOMES_FACT).items()}


def disk_usage_of(event: dict) -> dict[str, float]:
    """The data dir sizes an event sets (DISK_USAGE_FACT), or none."""
    return {str(k): float(v) for k, v in fact_of(event, DISK_USAGE_FACT).items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _outcomes(stores: list[dict], runner, failures: dict[str, str],
              interrupted: str | None = None,
              verdicts: dict[str, str] | None = None) -> dict[str, HostOutcome]:
    """Each store's result, from the verdicts of a judging task if one named it, else
    from the run's stats and the failures seen in its events.

    An interrupted run fails every store: none of them was seen to the end."""
    stats = runner.stats or {}
    verdicts = verdicts or {}
    hosts: dict[str, HostOutcome] = {}
    for store in stores:
        name = store["name"]
        if interrupted is not None:
            earlier = f"; before that: {failures[name]}" if name in failures else ""
            hosts[name] = HostOutcome(ok=False, error=interrupted + earlier)
            continue
        if name in verdicts:
            hosts[name] = HostOutcome(ok=not verdicts[name], error=verdicts[name] or None,
                                      judged=True)
            continue
        failed = name in failures or name in (stats.get("failures") or {}) or \
            name in (stats.get("dark") or {})
        seen = any(name in (stats.get(key) or {}) for key in ("ok", "failures", "dark", "skipped"))
        error = failures.get(name)
        if not seen and not failed:
            error = (f"ansible did not reach {name} (run {runner.status}, rc {runner.rc}): "
                     f"{_stdout_tail(runner)}")
        hosts[name] = HostOutcome(ok=seen and not failed,
                                  changed=(stats.get("changed") or {}).get(name, 0), error=error)
    return hosts


# -- the processes of a run ---------------------------------------------------

def _proc_read(pid: int, name: str) -> bytes:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:  # gone, or not ours to read
        return b""


def _parents() -> dict[int, int]:
    """Every live process and its parent."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_read(int(entry.name), "stat").rpartition(b")")[2].split()
            if len(fields) > 1 and fields[0] != b"Z":
                parents[int(entry.name)] = int(fields[1])
    return parents


def is_playbook_of(pid: int, ident: str) -> bool:
    """Whether `pid` is ansible-playbook of run `ident` (its run dir is in the command
    line), the main process or a forked worker, and not a recycled pid."""
    args = _proc_read(pid, "cmdline").split(b"\0")
    return any(arg.endswith(b"ansible-playbook") for arg in args) and \
        any(ident.encode() in arg for arg in args)


def _marked(pid: int, ident: str) -> bool:
    return f"{RUN_MARK}={ident}".encode() in _proc_read(pid, "environ").split(b"\0")


def run_processes(ident: str) -> set[int]:
    """The run's ansible-playbook processes and everything they started that still
    hangs off them (a daemon a task started has left the tree and is spared)."""
    parents = _parents()
    found = {pid for pid in parents if pid != os.getpid() and is_playbook_of(pid, ident)}
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _signal(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, number)


def _signal_group(leader: int, number: int) -> None:
    """The leader's process group, when it leads one (ansible-runner starts it so)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(leader) == leader:
            os.killpg(leader, number)


def end_run_processes(ident: str, leader: int | None = None,
                      grace: float = KILL_GRACE_SECONDS) -> list[int]:
    """SIGTERM every process of the run, SIGKILL what is left after `grace`.

    A process whose parent was ended before it leaves the tree; it is still
    followed while it carries the run's mark. `leader`, ansible-playbook's pid
    if known, has its process group ended too. Returns the pids ended."""
    ended: set[int] = set()
    kill_at = time.monotonic() + grace
    give_up_at = kill_at + grace
    while time.monotonic() < give_up_at:
        pids = run_processes(ident) | {pid for pid in ended if _marked(pid, ident)}
        if not pids:
            break
        killing = time.monotonic() >= kill_at
        number = signal.SIGKILL if killing else signal.SIGTERM
        for pid in pids if killing else pids - ended:
            if pid == leader:
                _signal_group(pid, number)
            _signal(pid, number)
        ended |= pids
        time.sleep(0.05)
    return sorted(ended)


def _cancel_callback(cancel: Callable[[], bool] | None) -> Callable[[], bool]:
    """Always given to ansible-runner: without one it installs SIGTERM and SIGINT
    handlers of its own (in the main thread) that outlive the run, so a later
    SIGTERM no longer stops the service. A callback that fails does not cancel
    (the run timeout still bounds it), and it raising would leave the run orphaned."""
    failed = False

    def cancelled() -> bool:
        nonlocal failed
        if cancel is None:
            return False
        try:
            return bool(cancel())
        except Exception:
            if not failed:
                log.exception("the cancel check of an ansible run failed")
            failed = True
            return False
    return cancelled


def run_playbook(config: Config, playbook: str, stores: list[dict], secrets: dict | None = None,
                 on_event: EventSink | None = None, limit: str | None = None,
                 ident: str | None = None, extra_vars: dict | None = None,
                 cancel: Callable[[], bool] | None = None) -> RunResult:
    """Run playbooks/<playbook> for the given stores in one ansible run."""
    ident = ident or new_ident(playbook)
    inventory = stores_inventory_yaml(stores)
    private_dir, lock = _private_run_dir(config, ident)
    extravars_file = private_dir / "env" / "extravars"
    _write_private(extravars_file, extra_vars_yaml(
        {**settings_vars(config), "provisioner_secrets": secrets or {}, **(extra_vars or {})}))
    # The run's stores, as hosts of group `stores` (kept with the artifacts: no secret).
    stores_inventory = private_dir / "stores.yml"
    _write_private(stores_inventory, inventory)
    failures: dict[str, str] = {}
    verdicts: dict[str, str] = {}
    usage: dict[str, float] = {}
    results: dict[str, dict] = {}

    def event_handler(event: dict) -> bool:
        if event.get("event") == "playbook_on_start":
            # ansible-playbook has read its extra vars by now.
            extravars_file.unlink(missing_ok=True)
        if event.get("event") in ("runner_on_failed", "runner_on_unreachable"):
            data = event.get("event_data") or {}
            if not data.get("ignore_errors"):
                # The last failure is the one that stopped the host (rescues come first).
                failures[data.get("host", "?")] = _error_of(event)
        verdicts.update(outcomes_of(event))
        usage.update(disk_usage_of(event))
        made = fact_of(event, STORE_RESULT_FACT)
        if made:
            results[(event.get("event_data") or {}).get("host", "?")] = made
        if on_event is not None:
            on_event(event)
        return True

    try:
        runner = init_runner(
            private_data_dir=str(private_dir), ident=ident,
            timeout=config.run_timeout_seconds, settings={"pexpect_timeout": POLL_SECONDS},
            cancel_callback=_cancel_callback(cancel),
            playbook=str(config.playbooks_dir / playbook),
            # The Docker hosts, and this run's stores.
            inventory=[str(config.inventory_file), str(stores_inventory)], limit=limit,
            forks=config.ansible_forks,
            envvars={
                "ANSIBLE_CONFIG": str(config.project_dir / "ansible.cfg"),
                "ANSIBLE_ROLES_PATH": str(config.project_dir / "roles"),
                "ANSIBLE_NOCOLOR": "1",
                # ansible-playbook lives beside the Python running us, venv or not.
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                RUN_MARK: ident,
                **strategy_env(config),
            },
            event_handler=event_handler, quiet=True)
        runner.config.env = minimal_env(runner.config.env, dict(os.environ))
        runner.run()
    finally:
        # ansible-runner kills ansible-playbook's group only; its workers and
        # what they started live on in sessions of their own.
        leftovers = end_run_processes(ident)
        extravars_file.unlink(missing_ok=True)
        os.close(lock)
    if leftovers:
        log.warning("run %s (%s): ended %d leftover processes", ident, runner.status,
                    len(leftovers))
    return RunResult(ident=ident, playbook=playbook, status=runner.status, rc=runner.rc,
                     artifact_dir=Path(runner.config.artifact_dir),
                     hosts=_outcomes(stores, runner, failures,
                                     _interruption(config, runner, ident), verdicts),
                     disk_usage=usage, store_results=results)
