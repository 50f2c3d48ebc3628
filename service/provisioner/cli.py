"""`provisioner` command line: serve, worker, health, sync, nginx, stats, cleanup, upgrade,
retry, replay."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from provisioner import models
from provisioner.config import Config, ConfigError, load_config


def _configure() -> Config:
    from provisioner import plans

    try:
        config = load_config()
        plans.all_plans(config)  # a bad PLANS_FILE stops start-up with one line
        config = models.open_database(config)
    except ConfigError as exc:
        print(f"provisioner: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return config


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_serve(args: argparse.Namespace) -> int:
    """Web service and scheduler, with the worker in a process of its own."""
    from provisioner import scheduler
    from provisioner.web import create_app
    from provisioner.web.server import make_server
    from provisioner.worker_process import supervise

    config = _configure()
    stop, wake = threading.Event(), threading.Event()
    worker = None if args.no_worker else supervise(stop, wake, config.stop_grace_seconds)
    scheduler.run(config, stop, wake)
    server = make_server(config, create_app(config, wake=wake), args.host, args.port)
    _stop_on_signals(stop)
    threading.Thread(target=lambda: (stop.wait(), server.stop()), daemon=True).start()
    logging.getLogger("provisioner").info("serving on http://%s:%s", args.host, args.port)
    try:
        server.start()
    finally:
        stop.set()
        if worker is not None:  # let the current run finish or be cancelled, then exit
            worker.join(config.stop_grace_seconds + 30)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """The worker alone: run apart from the web service, or started by `serve`."""
    from provisioner.worker import Worker
    from provisioner.worker_process import follow_parent

    config = _configure()
    stop, wake = threading.Event(), threading.Event()
    _stop_on_signals(stop)
    if args.wake_fd is not None:
        follow_parent(args.wake_fd, args.parent_pid, stop, wake)
    Worker(config, wake, stop).run_forever(stop)
    return 0


def _progress(line: str) -> None:
    print(f"  … {line}", flush=True)


def _finish(report, extra_failed: bool = False) -> int:
    for line in report.lines:
        print(f"  {line}")
    print(report.summary())
    return 1 if report.failed or extra_failed else 0


def cmd_maintenance(args: argparse.Namespace) -> int:
    """health | sync | nginx: run now, in this process, with progress and a summary."""
    from provisioner import maintenance
    from provisioner.worker import drain

    config = _configure()
    if args.command == "sync" and args.check:
        # Drift only: exit 1 when Docker or nginx differ from the DB (for monitoring).
        report = maintenance.sync(config, progress=_progress, check=True)
        return _finish(report, extra_failed=bool(report.counts["drifted"]
                                                 or report.counts["unknown"]))
    report = maintenance.run(config, args.command, progress=_progress)
    if args.command == "sync" and report.counts.get("corrected"):
        _progress("converging the stores sync corrected…")
        drain(config, timeout=args.timeout)
        report.failed = report.failed or _failed_since(report)
    return _finish(report)


def _failed_since(report) -> bool:
    from pony.orm import db_session

    from provisioner.models import Instance

    with db_session:
        return Instance.select(lambda i: i.live and i.status == "failed").exists()


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Archive then destroy stores past their deletion date; remove stopped orphan
    containers; rotate old ansible artifacts and logs."""
    from provisioner import maintenance
    from provisioner.states import JobKind
    from provisioner.worker import drain

    config = _configure()
    report = maintenance.run(config, JobKind.CLEANUP, progress=_progress)
    if report.queued:
        _progress(f"archiving then destroying {len(report.queued)} store(s)…")
        drain(config, timeout=args.timeout)
        maintenance.report_destroyed(report)
    return _finish(report)


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Roll a new image over the running stores, N at a time, rolling back on failure."""
    from provisioner import maintenance

    config = _configure()
    image = args.image or config.ebuilder_image
    if args.batch < 1:
        print("provisioner: --batch must be at least 1", file=sys.stderr)
        return 2
    return _finish(maintenance.upgrade(config, image, args.batch, progress=_progress))


def cmd_ansible_vars(args: argparse.Namespace) -> int:
    """The service's settings as Ansible variables, for a sysadmin's group_vars."""
    from provisioner.ansible.runner import settings_vars
    from provisioner.ansible.untrusted import extra_vars_yaml

    config = _configure()
    print("---\n# Written by `provisioner ansible-vars` from the provisioner's settings.")
    print(extra_vars_yaml(settings_vars(config)), end="")
    return 0


def cmd_hosts(args: argparse.Namespace) -> int:
    """The Docker hosts with their room; --check: can each take stores?"""
    from pony.orm import db_session

    from provisioner import docker_hosts, hosts_check

    config = _configure()
    with db_session:
        rows = docker_hosts.capacity(config)
    for row in rows:
        state = " draining" if row["draining"] and row["listed"] else \
            " (not in the inventory)" if not row["listed"] else ""
        room = f"{row['stores']} of {row['max_stores']} stores" if row["listed"] else \
            f"{row['stores']} stores"
        print(f"{row['name']}{state}: {room}, room for {row['free']}"
              + (f", stores publish on {row['address']}" if row["address"] else ""))
    if not args.check:
        return 0
    results = hosts_check.check_all(config, args.host)
    for result in results:
        print(f"  {result.line()}")
    failed = [r for r in results if not r.ok]
    print(f"hosts --check: {len(results) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


def cmd_record_run(args: argparse.Namespace) -> int:
    """A sysadmin's playbook run, as the playbooks' callback plugin reports it (JSON on
    stdin: a run, or a list of them): kept as a run of its stores, what it did taken over."""
    import json

    from provisioner import sysadmin_runs

    config = _configure()
    try:
        data = json.loads(sys.stdin.read())
        runs = [sysadmin_runs.parse(item) for item in (data if isinstance(data, list)
                                                       else [data])]
    except (ValueError, sysadmin_runs.BadRecord) as exc:
        print(f"provisioner record-run: {exc}", file=sys.stderr)
        return 1
    for run in runs:  # one per playbook of the ansible-playbook run, in order
        for line in sysadmin_runs.record(config, run):
            print(line)
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """Every setting with its default and meaning (the README's table), or a check of them."""
    from provisioner.config import settings_table

    if args.check:
        _configure()
        print("provisioner: configuration is valid")
        return 0
    print(settings_table(), end="")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """The settings file as the systemd units read it: its syntax, every setting, its
    mode and the files it names, with no database opened and no secret shown."""
    from pathlib import Path

    from provisioner import env_file
    from provisioner.config import env_file_path

    path = Path(args.env_file) if args.env_file else env_file_path()
    problems = env_file.check(path)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 1
    print(f"{path}: ok")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Counts for the terminal, or JSON for scripts."""
    import json

    from pony.orm import db_session

    from provisioner import admin

    config = _configure()
    with db_session:
        stats = admin.stats(config)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    rows = [(f"stores {state}", n) for state, n in sorted(stats["instances_by_status"].items())]
    rows += [("stores total", stats["instances_total"]),
             ("paying subscriptions", stats["paying_subscriptions"]),
             ("past due", stats["past_due_subscriptions"]),
             ("in trial", stats["trialing_subscriptions"]),
             ("MRR", f"{stats['monthly_recurring_revenue_pence'] / 100:.2f} "
                     f"{stats['revenue']['currency'].upper()}"),
             ("churn (30 days)", f"{stats['revenue']['churn_rate'] * 100:.1f}%"),
             ("failed payments (30 days)", stats["revenue"]["failed_payments_in_window"]),
             ("disputes (30 days)", stats["revenue"]["disputes_in_window"]),
             ("signups (30 days)", sum(stats["signups_per_day"].values())),
             ("cancellations (30 days)", sum(stats["cancellations_per_day"].values())),
             ("failed jobs", stats["job_failures"]),
             ("events received / failed",
              f"{stats['events_received']} / {stats['events_failed']}")]
    rows += [(f"plan {p['plan'] or p['price_id']}",
              f"{p['active']} active, {p['trialing']} in trial, {p['past_due']} past due, "
              f"MRR {p['mrr_pence'] / 100:.2f}") for p in stats["revenue"]["plans"]]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value:>10}")
    return 0


def _cli_actor():
    """The audit log's actor for this command: "cli:<unix user>"."""
    import getpass

    from provisioner import admin

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid
        user = str(os.getuid())
    return admin.Actor(f"cli:{user}")


def _refused(what: str, exc: Exception) -> int:
    print(f"provisioner: {what}: {exc}", file=sys.stderr)
    return 1


def cmd_retry(args: argparse.Namespace) -> int:
    """Queue a fresh converge of a failed, out-of-step or parked store; the worker (or
    --wait, here) does the work."""
    from pony.orm import db_session

    from provisioner import admin

    config = _configure()
    try:
        with db_session:
            store = admin.find_instance(args.store)
            result = admin.retry_store(config, store.id, _cli_actor())
    except admin.NotFound as exc:
        return _refused("retry", exc)
    except admin.Conflict as exc:
        return _refused("retry refused", exc)
    print(f"retry of {result['subdomain']} (store {result['instance_id']}): billing says "
          f"{result['desired_state']}")
    for job in result["queued"]:
        print(f"  queued job {job['id']}: {job['kind']} {job['detail'] or ''}".rstrip())
    if not result["queued"]:
        print("  nothing to run until billing says otherwise")
    if not args.wait:
        print("the running worker will do it; `provisioner retry --wait` runs it here")
        return 0
    return _wait_for_store(config, result["instance_id"], args.timeout)


def _wait_for_store(config: Config, instance_id: int, timeout: float) -> int:
    from pony.orm import db_session

    from provisioner import admin
    from provisioner.worker import drain

    _progress("running the queued work…")
    drain(config, timeout=timeout)
    with db_session:
        store = admin.get_instance(instance_id)
        status, message = store.status, store.status_message
    print(f"store {instance_id} is {status}" + (f": {message}" if message else ""))
    return 1 if status in admin.RETRY_STATES else 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Queue a recorded Stripe event to be applied again."""
    from pony.orm import db_session

    from provisioner import admin

    config = _configure()
    try:
        with db_session:
            event = admin.find_event(args.event)
            job = admin.replay_event(event.id, _cli_actor())
            event_id, label, job_id = event.id, f"{event.stripe_id} ({event.type})", job.id
    except admin.NotFound as exc:
        return _refused("replay", exc)
    except admin.Conflict as exc:
        return _refused("replay refused", exc)
    print(f"replay of {label}: queued job {job_id}")
    if not args.wait:
        print("the running worker will apply it; `provisioner replay --wait` applies it here")
        return 0
    return _wait_for_event(config, event_id, args.timeout)


def _wait_for_event(config: Config, event_id: int, timeout: float) -> int:
    from pony.orm import db_session

    from provisioner import admin
    from provisioner.worker import drain

    _progress("applying the event…")
    drain(config, timeout=timeout)
    with db_session:
        event = admin.event_detail(event_id)
    print(f"event {event['stripe_id']} is {event['state']}" +
          (f": {event['error']}" if event["error"] else ""))
    return 0 if event["state"] == "processed" else 1


def _store_care(args: argparse.Namespace, what: str, request) -> int:
    """Queue a backup, restore, clone or move of a store (audited as the CLI user), then
    with --wait do it here and say how it went."""
    from pony.orm import db_session

    from provisioner import admin

    config = _configure()
    try:
        with db_session:
            store = admin.find_instance(args.store) if args.store is not None else None
            result = request(config, store.id if store else None)
    except admin.NotFound as exc:
        return _refused(what, exc)
    except admin.Conflict as exc:
        return _refused(f"{what} refused", exc)
    print(f"{what} of {args.store or 'every running store'}: queued job {result['job_id']}")
    if not args.wait:
        print(f"the running worker will do it; `provisioner {what} --wait` does it here")
        return 0
    from provisioner.models import Job
    from provisioner.worker import drain

    _progress(f"{what}…")
    deadline = time.monotonic() + args.timeout
    while True:
        # Done here, unless a running worker took it first: then its outcome is awaited.
        drain(config, timeout=max(1.0, deadline - time.monotonic()))
        with db_session:
            job = Job[result["job_id"]]
            state, error, retrying = job.state, job.last_error, job.attempts > 0
            done = [e.message for e in job.logs.select(lambda e: e.level == "info"
                                                       ).order_by(lambda e: e.id)]
        if state in ("done", "failed") or time.monotonic() > deadline:
            break
        if state == "queued" and retrying:
            print(f"{what} failed, to be retried: {error}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    if state == "done":
        print(done[-1] if done else f"{what} done")
        return 0
    print(f"{what} {state}: {error}", file=sys.stderr)
    return 1


def cmd_backup(args: argparse.Namespace) -> int:
    """Back up one store now, or list its backups; without a store, every running store."""
    from pony.orm import db_session

    from provisioner import admin, backups

    if args.store is None:
        return _store_care(args, "backup",
                           lambda config, _: admin.backup_all(_cli_actor()))
    if args.list:
        _configure()
        with db_session:
            try:
                rows = backups.listing(admin.find_instance(args.store))
            except admin.NotFound as exc:
                return _refused("backup", exc)
        for row in rows:
            print(f"{row['id']:>6}  {row['created_at']}  {row['status']:<7} {row['reason']:<11} "
                  f"{row['size_bytes'] or 0:>12}  {row['path']}"
                  + (f"  ({row['error']})" if row["error"] else ""))
        return 0
    return _store_care(args, "backup",
                       lambda config, store_id: admin.backup_store(store_id, _cli_actor()))


def cmd_restore(args: argparse.Namespace) -> int:
    """Put a store's backup back (the newest good one unless named)."""
    from provisioner import admin

    return _store_care(args, "restore", lambda config, store_id: admin.restore_store(
        store_id, args.backup, _cli_actor()))


def cmd_clone(args: argparse.Namespace) -> int:
    """A new store with a copy of another's data, for support."""
    from provisioner import admin

    return _store_care(args, "clone", lambda config, store_id: admin.clone_store(
        config, store_id, args.new_subdomain, args.backup, _cli_actor()))


def cmd_move(args: argparse.Namespace) -> int:
    """Move a store to another Docker host."""
    from provisioner import admin

    return _store_care(args, "move", lambda config, store_id: admin.move_store(
        config, store_id, args.docker_host, _cli_actor()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="provisioner", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="web service + scheduler, and the worker beside it")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true",
                       help="web and scheduler only (a `provisioner worker` runs apart)")
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="run the job worker only")
    # Given by `serve` when it starts the worker (provisioner.worker_process).
    worker.add_argument("--wake-fd", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)
    for name, text in (("health", "check every running store; restart once, then alert"),
                       ("sync", "compare Docker with the DB and correct"),
                       ("nginx", "re-render every vhost; one nginx -t, one reload")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--timeout", type=float, default=1800)
        if name == "sync":
            command.add_argument("--check", action="store_true",
                                 help="report where Docker and nginx differ from the DB, "
                                      "change nothing (exit 1 if they do)")
        command.set_defaults(func=cmd_maintenance)
    cleanup = sub.add_parser("cleanup", help="archive+destroy due stores, orphans, old logs")
    cleanup.add_argument("--timeout", type=float, default=1800)
    cleanup.set_defaults(func=cmd_cleanup)
    upgrade = sub.add_parser("upgrade", help="roll a new image over running stores")
    upgrade.add_argument("--image", help="image to roll out (default: EBUILDER_IMAGE)")
    upgrade.add_argument("--batch", type=int, default=1, help="stores per batch")
    upgrade.set_defaults(func=cmd_upgrade)
    ansible_vars = sub.add_parser("ansible-vars",
                                  help="print settings as Ansible vars (inventory/group_vars)")
    ansible_vars.set_defaults(func=cmd_ansible_vars)
    settings = sub.add_parser("settings", help="list every setting (markdown); --check validates")
    settings.add_argument("--check", action="store_true",
                          help="load .env and the environment, report the first bad setting")
    settings.set_defaults(func=cmd_settings)
    check_config = sub.add_parser("check-config", help="check the settings file as the "
                                                       "systemd units read it")
    check_config.add_argument("--env-file", metavar="PATH",
                              help="the file (default: what a command run here reads: "
                                   "PROVISIONER_ENV_FILE, ./.env, the project's .env, "
                                   "/etc/ebuilder-provisioner.env)")
    check_config.set_defaults(func=cmd_check_config)
    hosts = sub.add_parser("hosts", help="the Docker hosts with their room; --check whether "
                                         "each can take stores")
    hosts.add_argument("host", nargs="?", help="check this host only")
    hosts.add_argument("--check", action="store_true",
                       help="reach it with Ansible, ask its Docker engine, its network and ports")
    hosts.set_defaults(func=cmd_hosts)
    record_run = sub.add_parser("record-run", help="keep a sysadmin's playbook run (JSON on "
                                                   "stdin; the playbooks' callback sends it)")
    record_run.set_defaults(func=cmd_record_run)
    stats = sub.add_parser("stats", help="counts per state, revenue, failures")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_stats)
    retry = sub.add_parser("retry", help="retry a failed, out-of-step or needs-attention store")
    retry.add_argument("store", help="the store's subdomain or id")
    replay = sub.add_parser("replay", help="apply a recorded Stripe event again")
    replay.add_argument("event", help="the event's Stripe id (evt_...) or its number")
    backup = sub.add_parser("backup", help="back up a store now (or every running store); "
                                           "--list its backups")
    backup.add_argument("store", nargs="?", help="the store's subdomain or id")
    backup.add_argument("--list", action="store_true", help="list the store's backups")
    restore = sub.add_parser("restore", help="put a store's backup back (stop, restore, "
                                             "start, health; its own data back on failure)")
    restore.add_argument("store", help="the store's subdomain or id")
    restore.add_argument("backup", nargs="?",
                         help="the backup's number or archive path (default: the newest good)")
    clone = sub.add_parser("clone", help="a new store with a copy of a store's data")
    clone.add_argument("store", help="the store's subdomain or id")
    clone.add_argument("new_subdomain", help="the clone's subdomain")
    clone.add_argument("--backup", help="clone this backup (default: one taken now)")
    move = sub.add_parser("move", help="move a store to another Docker host (down only "
                                       "while its data is copied)")
    move.add_argument("store", help="the store's subdomain or id")
    move.add_argument("docker_host", help="the Docker host (inventory name) to move it to")
    for command, func in ((retry, cmd_retry), (replay, cmd_replay), (backup, cmd_backup),
                          (restore, cmd_restore), (clone, cmd_clone), (move, cmd_move)):
        command.add_argument("--wait", action="store_true",
                             help="do the queued work in this process and report the outcome")
        command.add_argument("--timeout", type=float, default=1800)
        command.set_defaults(func=func)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
