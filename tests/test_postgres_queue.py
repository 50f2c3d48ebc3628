"""The job queue on a real PostgreSQL server, shared by separate OS processes (each binds
Pony to the same database, as workers on different machines do): every job claimed
exactly once, never two running jobs of one store, an expired lease taken over, a live
worker's lease renewed and never taken, processes starting together on a fresh
database, and concurrent enqueues of one job giving one job.

Each process is `python -m tests.test_postgres_queue <role> <json args>`; they start
their work together (a file barrier) and print their findings as one JSON line."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT = 120.0
KINDS = ("converge", "action")


# -- the parent's side ------------------------------------------------------------


def _env(url: str, data_dir: Path) -> dict[str, str]:
    return {
        "STRIPE_WEBHOOK_SECRET": "whsec_test_" + "x" * 24,
        "BASE_DOMAIN": "stores.test",
        "PROVISIONER_DATA_DIR": str(data_dir),
        "DATABASE_URL": url,
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
    }


def run_processes(tmp_path: Path, url: str, roles: list[tuple[str, dict]]) -> list[dict]:
    """Start one process per (role, args), let them start their work together, and
    return what each printed (failing with its output when one failed)."""
    barrier = tmp_path / f"barrier-{time.monotonic_ns()}"
    barrier.mkdir()
    processes = []
    for n, (role, args) in enumerate(roles):
        spec = {**args, "barrier": str(barrier), "n": n}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "tests.test_postgres_queue", role, json.dumps(spec)],
            cwd=ROOT, env=_env(url, tmp_path / f"data-{n}"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while len(list(barrier.glob("ready-*"))) < len(roles):
            ended = [p for p in processes if p.poll() is not None and p.returncode != 0]
            if ended:
                raise AssertionError(f"a process failed before starting: {ended[0].stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("the processes did not get ready in time")
            time.sleep(0.02)
        (barrier / "go").touch()
        results = []
        for process in processes:
            out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert process.returncode == 0, f"process failed (rc {process.returncode}):\n{err}"
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def run_one(tmp_path: Path, url: str, role: str, **args) -> dict:
    return run_processes(tmp_path, url, [(role, args)])[0]


def rows(postgres_server, url: str, sql: str) -> list[tuple]:
    with contextlib.closing(postgres_server.connect(url.rsplit("/", 1)[1])) as connection, \
            connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


@pytest.fixture
def database(postgres_server, tmp_path):
    """A fresh PostgreSQL database with the schema made by one process."""
    url = postgres_server.create_database()
    run_one(tmp_path, url, "bind")
    return url


def test_processes_starting_together_make_one_schema_and_one_installation(
        postgres_server, postgres_url, tmp_path):
    results = run_processes(tmp_path, postgres_url, [("bind", {})] * 4)
    assert len({r["installation_id"] for r in results}) == 1, results
    assert len({r["link_key"] for r in results}) == 1, results
    assert rows(postgres_server, postgres_url,
                "SELECT key, value FROM setting WHERE key = 'installation_id'") == \
        [("installation_id", results[0]["installation_id"])]
    indexes = {name for (name,) in rows(postgres_server, postgres_url,
                                        "SELECT indexname FROM pg_indexes")}
    assert {"instance_live_subdomain", "instance_live_port", "customdomain_live_name",
            "alertincident_open_key"} <= indexes


def test_workers_claiming_together_run_each_job_once_and_one_job_per_store(
        postgres_server, database, tmp_path):
    stores, per_store, claimers = 30, 6, 3
    run_one(tmp_path, database, "seed", stores=stores, per_store=per_store)
    results = run_processes(tmp_path, database, [("claimer", {"seed": n})
                                                 for n in range(claimers)])
    claims = [claim for result in results for claim in result["claims"]]
    job_ids = [job_id for job_id, _, _, _ in claims]
    assert len(job_ids) == stores * per_store
    assert len(set(job_ids)) == len(job_ids), "a job was claimed twice"
    assert all(result["claims"] for result in results), "a worker claimed nothing"
    assert [v for result in results for v in result["violations"]] == []
    # Never two claims of one store held at once, across processes.
    by_store = defaultdict(list)
    for _, instance_id, started, ended in claims:
        by_store[instance_id].append((started, ended))
    for instance_id, spans in by_store.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, f"store {instance_id} had two jobs running at once"
    assert rows(postgres_server, database,
                "SELECT state, attempts, count(*) FROM job GROUP BY state, attempts") == \
        [("done", 1, stores * per_store)]


def test_an_expired_lease_is_taken_over_by_another_worker(postgres_server, database,
                                                          tmp_path):
    run_one(tmp_path, database, "seed", stores=1, per_store=1)
    held = run_one(tmp_path, database, "die_holding", lease_seconds=4)
    taken = run_one(tmp_path, database, "take_over", job_id=held["job_id"])
    assert taken["checked_before_expiry"], "the lease ran out before it could be tried"
    assert taken["before_expiry"] == [], "a live lease was taken"
    assert taken["after_expiry"] == [held["job_id"]]
    assert rows(postgres_server, database, "SELECT state, attempts FROM job") == \
        [("running", 2)]


def test_a_live_workers_renewed_lease_is_not_taken_nor_requeued_by_a_starting_worker(
        postgres_server, database, tmp_path):
    run_one(tmp_path, database, "seed", stores=1, per_store=1)
    holder, other = run_processes(tmp_path, database, [
        ("hold_renewing", {"lease_seconds": 1.5, "hold_seconds": 4}),
        ("try_to_take", {"for_seconds": 3.5})])
    assert holder["claimed"] and holder["renewed"] >= 3
    assert other["claimed"] == [] and other["requeued"] == 0
    state, attempts, locked_until = rows(
        postgres_server, database, "SELECT state, attempts, locked_until FROM job")[0]
    assert (state, attempts) == ("done", 1)
    assert locked_until is None


def test_concurrent_enqueues_of_one_job_queue_it_once(postgres_server, database, tmp_path):
    run_one(tmp_path, database, "seed", stores=40, per_store=0)
    run_processes(tmp_path, database, [("enqueue", {})] * 4)
    counts = rows(postgres_server, database,
                  "SELECT instance, count(*) FROM job WHERE kind = 'reconcile' "
                  "AND state = 'queued' GROUP BY instance")
    assert len(counts) == 40
    assert {count for _, count in counts} == {1}


# -- the processes' side ----------------------------------------------------------


def _open():
    from provisioner import models
    from provisioner.config import load_config

    config = load_config(dict(os.environ), env_file=Path(os.environ["PROVISIONER_DATA_DIR"])
                         / "no.env")
    return models.open_database(config)


def _start_together(spec: dict) -> None:
    barrier = Path(spec["barrier"])
    (barrier / f"ready-{spec['n']}").touch()
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not (barrier / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go")
        time.sleep(0.005)


def role_bind(spec: dict) -> dict:
    _start_together(spec)
    from provisioner import models

    config = _open()
    return {"installation_id": config.installation_id,
            "link_key": models.kept_setting(models.ACCOUNT_LINK_KEY)}


def role_seed(spec: dict) -> dict:
    from pony.orm import db_session

    from provisioner.models import Instance, Job

    _open()
    _start_together(spec)
    with db_session:
        for n in range(spec["stores"]):
            instance = Instance(subdomain=f"store{n}", site_name=f"Store {n}",
                                admin_email=f"s{n}@example.com", port=20000 + n)
            for m in range(spec["per_store"]):
                Job(kind=KINDS[m % 2], instance=instance, detail=f"job {m}")
    return {}


def role_claimer(spec: dict) -> dict:
    from pony.orm import count, db_session, select

    from provisioner import jobs
    from provisioner.models import Job

    _open()
    _start_together(spec)
    chance = random.Random(spec["seed"])
    claims, violations = [], []
    deadline = time.monotonic() + PROCESS_TIMEOUT / 2
    while time.monotonic() < deadline:
        with db_session:
            claimed = jobs.claim_due(limit=chance.randint(1, 4), kinds=KINDS)
            of = {job_id: Job[job_id].instance.id for job_id in claimed}
        started = time.time()
        if not claimed:
            with db_session:
                if jobs.pending_count() == 0:
                    break
            time.sleep(0.002)  # the others hold what is left: ask again
            continue
        with db_session:
            running = select((j.instance.id, count(j)) for j in Job
                             if j.state == jobs.RUNNING)[:]
        violations += [f"store {i}: {n} running" for i, n in running if n > 1]
        time.sleep(chance.uniform(0.001, 0.008))  # the job's work
        ended = time.time()
        with db_session:
            for job_id in claimed:
                jobs.complete(Job[job_id])
        claims += [(job_id, of[job_id], started, ended) for job_id in claimed]
    return {"claims": claims, "violations": violations}


def role_die_holding(spec: dict) -> dict:
    from datetime import timedelta

    from pony.orm import db_session

    from provisioner import jobs

    _open()
    _start_together(spec)
    jobs.LEASE = timedelta(seconds=spec["lease_seconds"])
    with db_session:
        claimed = jobs.claim_due(kinds=KINDS)
    print(json.dumps({"job_id": claimed[0]}), flush=True)
    os._exit(0)  # dies holding the job: never completes nor releases it


def role_take_over(spec: dict) -> dict:
    from datetime import timedelta

    from pony.orm import db_session

    from provisioner import jobs, worker
    from provisioner.models import Job, utcnow

    config = _open()
    _start_together(spec)
    with db_session:
        lease = Job[spec["job_id"]].locked_until
    # A worker starting now leaves the running job to its lease.
    assert worker.recover_abandoned(config) == 0
    before, checked = [], utcnow() < lease - timedelta(seconds=1)
    if checked:
        with db_session:
            before = jobs.claim_due(kinds=KINDS)
    deadline = time.monotonic() + 30
    after: list[int] = []
    while not after and time.monotonic() < deadline:
        with db_session:
            after = jobs.claim_due(kinds=KINDS)
        time.sleep(0.1)
    return {"before_expiry": before, "checked_before_expiry": checked, "after_expiry": after}


def role_hold_renewing(spec: dict) -> dict:
    from datetime import timedelta

    from pony.orm import db_session

    from provisioner import jobs
    from provisioner.models import Job

    _open()
    jobs.LEASE = timedelta(seconds=spec["lease_seconds"])
    with db_session:
        claimed = jobs.claim_due(kinds=KINDS)
        held = {job_id: jobs.lease_of(job_id) for job_id in claimed}
    _start_together(spec)
    renewed = 0
    ends = time.monotonic() + spec["hold_seconds"]
    while time.monotonic() < ends:  # a run longer than the lease, renewed as the worker does
        time.sleep(spec["lease_seconds"] / 3)
        fresh = jobs.renew_leases(held)
        renewed += bool(fresh)
        held.update(fresh)
    with db_session:
        for job_id in claimed:
            jobs.complete(Job[job_id])
    return {"claimed": claimed, "renewed": renewed}


def role_try_to_take(spec: dict) -> dict:
    from pony.orm import db_session

    from provisioner import jobs, worker

    config = _open()
    _start_together(spec)
    requeued = worker.recover_abandoned(config)
    claimed: list[int] = []
    ends = time.monotonic() + spec["for_seconds"]
    while time.monotonic() < ends:
        with db_session:
            claimed += jobs.claim_due(kinds=KINDS)
        time.sleep(0.2)
    return {"claimed": claimed, "requeued": requeued}


def role_enqueue(spec: dict) -> dict:
    from pony.orm import db_session

    from provisioner import jobs
    from provisioner.models import Instance

    _open()
    with db_session:
        ids = [i.id for i in Instance.select().order_by(Instance.id)]
    _start_together(spec)
    for instance_id in ids:
        for _ in range(50):  # a deadlock or serialisation loser tries again, as a job would
            try:
                with db_session:
                    jobs.enqueue("reconcile", instance=Instance[instance_id])
                break
            except Exception as exc:  # noqa: BLE001
                print(f"retrying enqueue: {exc}", file=sys.stderr)
    return {}


if __name__ == "__main__":
    role, raw = sys.argv[1], sys.argv[2]
    print(json.dumps(globals()[f"role_{role}"](json.loads(raw))), flush=True)
