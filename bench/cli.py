"""bench/run: every figure of the provisioner beside a raw floor measured in the same run.

Prints one table (figure | provisioner | floor | ratio | goal | met?) and notes. Goals
are reported, not asserted: the exit code is 0 whenever the benchmark ran, 1 when it
broke (a store never went live, the service died, a playbook failed), 130 on Ctrl-C.
Everything it makes is labelled with its own installation id and removed on exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

from bench import (
    admin_list,
    batching,
    converge,
    fleet,
    health_sweep,
    memory,
    nginx_regen,
    signup,
    storage,
    webhook_latency,
)
from bench.stack import IMAGE, BenchError, BenchStack, log, run
from bench.table import Report, Row, at_most, below, ratio_at_most

# name: (full, quick)
SIZES = {
    "rate": (200.0, 100.0),
    "seconds": (10.0, 3.0),
    "sweep_rate": (20.0, 20.0),
    "signups": (3, 1),
    "burst": (20, 3),
    "fleet": (500, 5),
    "converge": (100, 5),
    "reps": (3, 3),
    "api_reps": (20, 10),
    "batching": (5, 0),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run", description=__doc__.split("\n\n")[0],
        epilog="Defaults are the full run's; --quick picks small ones (any flag given "
               "still wins). Needs scripts/setup.sh (Docker, nginx, the stand-in image).")
    parser.add_argument("--quick", action="store_true",
                        help="small N (CI): about 4 minutes on 2 cores")
    parser.add_argument("--rate", type=float, help="webhooks per second (200; quick 100)")
    parser.add_argument("--seconds", type=float, help="seconds of webhooks (10; quick 3)")
    parser.add_argument("--sweep-rate", type=float,
                        help="webhooks per second during the health sweep (20)")
    parser.add_argument("--signups", type=int, help="single signups timed (3; quick 1)")
    parser.add_argument("--burst", type=int, help="signups in the burst (20; quick 3)")
    parser.add_argument("--burst-100", action="store_true",
                        help="also a burst of 100 signups (and its floor)")
    parser.add_argument("--fleet", type=int,
                        help="running stores for the sweep, nginx and the API (500; quick 5)")
    parser.add_argument("--converge", type=int,
                        help="stores converged in one run (100, e.g. 900; quick 5); the "
                             "fleet grows to at least this many")
    parser.add_argument("--fleet-chunk", type=int, default=100,
                        help="stores per playbook run while building the fleet (100)")
    parser.add_argument("--reps", type=int, help="repetitions of the cheap floors (3)")
    parser.add_argument("--api-reps", type=int, help="requests per admin API figure (20)")
    parser.add_argument("--batching", type=int,
                        help="stores for one-run-each vs batched (5; quick 0 = skip)")
    parser.add_argument("--no-during-sweep", action="store_true",
                        help="skip the webhook latency during a health sweep")
    parser.add_argument("--forks", type=int,
                        help="the service's ANSIBLE_FORKS (its default when not given)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (logs, DB, ansible artifacts) after the run")
    args = parser.parse_args(argv)
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("signups", "burst", "fleet", "converge", "reps", "api_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def med(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) + " s"


def preflight() -> None:
    for argv, what in ((["docker", "info"], "no Docker engine answers"),
                       (["docker", "image", "inspect", IMAGE], f"no image {IMAGE}"),
                       (["nginx", "-v"], "no nginx"), (["openssl", "version"], "no openssl")):
        try:
            run(argv, timeout=60)
        except (BenchError, OSError) as exc:
            raise BenchError(f"{what}: run scripts/setup.sh first ({exc})") from None


def measure(args: argparse.Namespace, stack: BenchStack, report: Report) -> None:
    t = report.add
    service = memory.Sampler(stack.service.pid).start()
    floor_app = memory.Sampler(stack.floor.pid).start()
    try:
        _measure(args, stack, report, t, service, floor_app)
    finally:
        service.stop()
        floor_app.stop()


def _measure(args, stack: BenchStack, report: Report, t, service: memory.Sampler,
             floor_app: memory.Sampler) -> None:
    # 7a. Idle memory, after a first request has loaded what a request needs.
    for port, path in ((stack.service_port, "/api/status/"), (stack.floor_port, "/instances")):
        admin_list.get(port, path, {})
    log("idle memory")
    idle_window = 2 if args.quick else 5
    with floor_app.phase("idle"):
        memory.idle(service, idle_window)

    # 1. Webhook acknowledgement at a fixed rate.
    log(f"webhooks: {args.rate:g}/s for {args.seconds:g} s, floor app then service")
    empty = storage.snapshot(stack)
    with service.phase("webhooks"), floor_app.phase("webhooks"):
        ack = webhook_latency.ack(stack, args.rate, args.seconds, drain_timeout=1800)
    # The synthetic events' rows are no store's: kept apart for the disk figures.
    load_db = storage.snapshot(stack).db_bytes - empty.db_bytes
    rate = f"{args.rate:g} req/s"
    t(Row(f"webhook ack p50 @ {rate}", ack.service.p(50), ack.floor.p(50)))
    t(Row(f"webhook ack p99 @ {rate}", ack.service.p(99), ack.floor.p(99),
          goal="<= 15 ms", check=at_most(0.015)))
    report.note(f"webhooks, floor app: {ack.floor.describe()}")
    report.note(f"webhooks, service:   {ack.service.describe()}")
    report.note(f"the worker applied the {ack.service.ok} acknowledged events "
                f"{ack.drain_seconds:.1f} s after the last one was sent")

    # 2. One signup.
    log(f"one signup: floor x{args.reps}, then {args.signups} signup(s)")
    floors = signup.floor_stores(stack, f"{stack.prefix}-p", 1, args.reps)
    signups = [signup.signups(stack, [f"{stack.prefix}-s{n}"]) for n in range(args.signups)]
    t(Row("one signup -> live through nginx", med(signups), med(floors),
          goal="<= 4x floor", check=ratio_at_most(4)))
    report.note(f"one signup: provisioner {spread(signups)} (webhooks posted to /health/ "
                f"200 through nginx); floor (docker run + vhost + reload + poll) "
                f"{spread(floors)}")

    # 3. Bursts.
    bursts = [(args.burst, "u", "q")] + ([(100, "h", "r")] if args.burst_100 else [])
    burst_phases = []
    for size, mark, floor_mark in bursts:
        log(f"burst of {size}: floor x{args.reps}, then {size} signups")
        floors = signup.floor_stores(stack, f"{stack.prefix}-{floor_mark}", size, args.reps)
        phase = f"burst {size}"
        burst_phases.append((size, phase))
        runs = signup.provision_runs()
        with service.phase(phase):
            seconds = signup.signups(stack, [f"{stack.prefix}-{mark}{n}" for n in range(size)])
        stack.wait_idle(900, f"the burst of {size}'s last run to be recorded")
        runs = signup.provision_runs() - runs
        times = 3 if size < 100 else 4
        t(Row(f"burst of {size} signups -> all live", seconds, med(floors),
              goal=f"<= {times}x floor", check=ratio_at_most(times)))
        report.note(f"burst of {size}: the worker built it in {runs} provision run(s) "
                    f"(the two ansible lanes may run them side by side); floor {spread(floors)}")
    stack.wait_idle(900, "the welcome emails of the signups")

    # 7b. Memory: idle, and the peak of the largest burst.
    size, phase = burst_phases[-1]
    t(Row("service RSS idle (process tree)", service.median("idle"),
          floor_app.median("idle"), unit="MB"))
    t(Row(f"service RSS peak, burst of {size} (tree)", service.peak(phase),
          floor_app.peak("webhooks"), unit="MB",
          goal="< 300 MB (burst of 100)", check=below(300e6)))
    t(Row(f"service PSS peak, burst of {size} (tree)", float(service.pss_peak.get(phase, 0)),
          unit="MB", goal="- (shared pages split)"))
    report.note(f"RSS is summed over the process tree (serve + ansible-playbook + forks); "
                f"peak RSS during the webhooks {service.peak('webhooks') / 1e6:.0f} MB; "
                f"RSS floor: the floor app process (idle, and peak under its webhook load)"
                + ("" if size >= 100 else "; the goal is for a burst of 100 "
                   "(--burst-100), this run's largest was " + str(size)))

    # The fleet for 4, 5, 6, 8, 9.
    target = max(args.fleet, args.converge)
    with service.phase("fleet"):
        made, seconds = fleet.grow(stack, target, args.fleet_chunk)
    stack.wait_idle(300)
    if made:
        report.note(f"fleet: {made} store(s) made in bulk through provision.yml in "
                    f"{seconds:.1f} s ({seconds / made:.2f} s per store, chunks of "
                    f"{args.fleet_chunk}); {fleet.running_count()} running stores in all")
    running = converge.stores(stack, target * 2 + 1000)
    names = [s.name for s in running]
    n = len(names)

    # 4. Health sweep (and 8: what one sweep adds on disk).
    log(f"health sweep of {n}: floor x{args.reps}, then provisioner health")
    floors = health_sweep.floor(stack, names, args.reps)
    before = storage.snapshot(stack)
    with service.phase("sweep"):
        sweep = health_sweep.cli(stack, timeout=3600)
    added = storage.snapshot(stack).minus(before)
    t(Row(f"health sweep, {n} stores (provisioner health)", sweep.wall, med(floors),
          goal="<= 3x floor", check=ratio_at_most(3)))
    report.note(f"health sweep: `{sweep.summary}` inside the command (wall "
                f"{sweep.wall:.1f} s includes its start-up); floor: parallel GETs, "
                f"{health_sweep.FLOOR_WIDTH} threads, {spread(floors)}")

    # 1b. Webhooks while the service's own worker sweeps.
    if not args.no_during_sweep:
        log(f"webhooks at {args.sweep_rate:g}/s: service idle, then during a health sweep "
            f"in its worker")
        before_db = storage.snapshot(stack).db_bytes
        during = webhook_latency.during_sweep(stack, args.sweep_rate, args.seconds, 3600)
        # Less the sweep's own rows (as many as the sweep above added).
        load_db += storage.snapshot(stack).db_bytes - before_db - added.db_bytes
        t(Row(f"webhook p99 during sweep @ {args.sweep_rate:g} req/s (floor: idle)",
              during.during.p(99), during.idle.p(99), goal="<= 15 ms", check=at_most(0.015)))
        t(Row(f"health sweep inside serve, {n} stores", during.sweep_seconds, med(floors),
              goal="<= 3x floor", check=ratio_at_most(3)))
        report.note(f"webhooks, service idle:       {during.idle.describe()}")
        report.note(f"webhooks, during the sweep:   {during.during.describe()}")
        report.note("health sweep inside serve: from the job queued to done, webhooks "
                    "arriving meanwhile")

    # 5. Converge of N unchanged stores.
    count = min(args.converge, n)
    floor_reps = 1 if args.quick else args.reps
    log(f"converge: one store x{floor_reps}, then {count} stores in one run")
    batch = running[:count]
    with service.phase("converge"):
        singles = [converge.converge(stack, batch[:1])[0] for _ in range(floor_reps)]
        seconds, changed = converge.converge(stack, batch)
        forced = batch[:min(count, 5)]
        through_roles, _ = converge.converge(stack, forced, every_store=True)
        # Time per store should stay flat as the batch grows: the whole fleet too.
        whole = converge.converge(stack, running[:n])[0] if n > count else None
    t(Row(f"converge {count} unchanged stores (one run)", seconds, med(singles),
          goal="<= 2x floor", check=ratio_at_most(2)))
    t(Row(f"converge: time per store ({count} stores)", seconds / count, med(singles)))
    if whole is not None:
        t(Row(f"converge: time per store, whole fleet ({n} stores)", whole / n,
              seconds / count, goal="- (floor: per store at the smaller batch)"))
    t(Row(f"converge: time per store through the roles ({len(forced)} stores)",
          through_roles / len(forced), seconds / count))
    report.note(f"converge: {changed} of {count} stores changed (0 expected); floor: the "
                f"same playbook over one store, {spread(singles)}; 'through the roles' is "
                "provision_every_store=true (no store left alone), its floor the checked "
                "time per store")

    # 6. nginx regeneration over N vhosts.
    log(f"provisioner nginx over {n} vhosts: nginx -t x{args.reps}, then the command")
    floors = nginx_regen.nginx_t(stack, args.reps)
    regen = nginx_regen.cli(stack, timeout=3600)
    t(Row(f"provisioner nginx, {n} vhosts unchanged", regen.wall, med(floors),
          goal="- (floor: nginx -t)"))
    t(Row("provisioner nginx: time per store", regen.wall / n, med(floors) / n,
          goal="- (floor: nginx -t / N)"))
    report.note(f"provisioner nginx: `{regen.summary}`; floor: a plain `nginx -t` of the "
                f"same configuration, {spread(floors)}")

    # 9. Admin API list at the fleet's size.
    log(f"admin API: {args.api_reps} lists and searches")
    needle = names[len(names) // 2]
    for label, query in (("admin API list (page of 50)", {}),
                         ("admin API list (per_page=200)", {"per_page": 200}),
                         (f"admin API search q={needle}", {"q": needle})):
        api, raw, total = admin_list.timings(stack, query, args.api_reps)
        t(Row(f"{label}, {total} of {n}+ stores", med(api), med(raw),
              goal="< 200 ms", check=below(0.2)))
    for label, path in (("admin dashboard page", "/admin/"),
                        ("admin store list page", "/admin/instances/")):
        page, raw = admin_list.page_timings(stack, path, args.api_reps)
        t(Row(f"{label}, {n}+ stores", med(page), med(raw), goal="< 200 ms", check=below(0.2)))
    stats, bare = admin_list.stats_timings(stack, args.reps)
    t(Row(f"provisioner stats, {n}+ stores", med(stats), med(bare),
          goal="- (floor: provisioner --help)"))
    report.note(f"admin API and pages: median of {args.api_reps} requests each; floor: the "
                "first page of the same list in raw sqlite3 behind Bottle/cheroot "
                "(floor_app.py)")

    # 8. Disk per store.
    live = _live_stores()
    now = storage.snapshot(stack)
    per_day = storage.SWEEPS_PER_DAY / n
    store_db = now.db_bytes - empty.db_bytes - load_db
    t(Row(f"DB bytes per store ({live} stores)", store_db / live, unit="B"))
    t(Row("artifact bytes per store", now.artifact_bytes / live, unit="B"))
    t(Row("artifact files per store", now.artifact_files / live, unit="files"))
    t(Row("DB bytes per store per day of sweeps", added.db_bytes * per_day, unit="B"))
    t(Row("artifact bytes per store per day of sweeps", added.artifact_bytes * per_day,
          unit="B"))
    t(Row("artifact files per store per day of sweeps", added.artifact_files * per_day,
          unit="files"))
    report.note(f"disk: DB = payload of rows and indexes (dbstat, WAL included): "
                f"{now.db_bytes / 1e6:.2f} MB in all, of which {load_db / 1e6:.2f} MB the "
                f"synthetic webhook load (not counted per store) and {empty.db_bytes} B the "
                f"empty schema; artifacts under data/ansible-runs, "
                f"{now.artifact_bytes / 1e6:.1f} MB in {now.artifact_files} files. One sweep of "
                f"{n} stores added {added.db_bytes} DB bytes and {added.artifact_bytes} "
                f"artifact bytes in {added.artifact_files} files; per day = that x "
                f"{storage.SWEEPS_PER_DAY} sweeps / {n} stores (kept ARTIFACT_RETENTION_DAYS, "
                f"30). No floor: nothing raw keeps these")

    # The old provision_batching bench: last, its stores have no DB rows.
    if args.batching:
        log(f"batching: {args.batching} stores one run each, then one batched run")
        separate, together = batching.compare(stack, args.batching)
        t(Row(f"provision {args.batching} new stores: batched (floor: one run each)",
              together, separate))
        report.note(f"batching: {args.batching} stores one run each {separate:.1f} s, one "
                    f"batched run {together:.1f} s ({separate / together:.1f}x faster)")
    report.note(f"peak service RSS over the whole run {service.overall_peak() / 1e6:.0f} MB")


def _live_stores() -> int:
    from pony.orm import count, db_session

    from provisioner.models import Instance

    with db_session:
        return count(i for i in Instance if i.live)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    # Ctrl-C, a CI's cancel, a closed terminal: all end in the same cleanup (SIGINT set
    # explicitly: a shell starts background jobs with it ignored).
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _interrupt)
    report = Report()
    load_before = os.getloadavg()[0]
    stack = None
    code = 0
    try:
        preflight()
        stack = BenchStack(keep=args.keep, forks=args.forks).start()
        measure(args, stack, report)
    except BenchError as exc:
        log(f"BROKEN: {exc}")
        code = 1
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    except Exception as exc:  # a bug in the bench is a broken bench too, with its trace
        import traceback

        traceback.print_exc()
        log(f"BROKEN: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        if stack is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            log("cleaning up (containers and networks labelled "
                f"{stack.installation_id}, nginx, service)")
            try:
                stack.close()
            except (OSError, subprocess.SubprocessError) as exc:
                log(f"cleanup: {exc}")
    elapsed = time.perf_counter() - started
    mode = "quick" if args.quick else "full"
    report.note(f"{mode} run, {elapsed:.0f} s in all, {os.cpu_count()} CPUs, load average "
                f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    if report.rows:
        print(report.render())
    sys.stdout.flush()
    if code == 1:
        print(f"bench: the benchmark broke (see above); {len(report.rows)} figure(s) measured",
              file=sys.stderr)
    return code
