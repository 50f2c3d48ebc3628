"""`provisioner` command line: serve, worker, cleanup."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from provisioner import models
from provisioner.config import Config, ConfigError, load_config


def _configure() -> Config:
    try:
        config = load_config()
        models.bind(config)
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
    """Web service, worker and scheduler in one process."""
    from cheroot import wsgi

    from provisioner.app import create_app
    from provisioner.worker import serve_worker

    config = _configure()
    stop, wake = threading.Event(), threading.Event()
    serve_worker(config, stop, wake)
    server = wsgi.Server((args.host, args.port), create_app(config, wake=wake), numthreads=8)
    _stop_on_signals(stop)
    threading.Thread(target=lambda: (stop.wait(), server.stop()), daemon=True).start()
    logging.getLogger("provisioner").info("serving on http://%s:%s", args.host, args.port)
    try:
        server.start()
    finally:
        stop.set()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """The worker alone, for running it apart from the web service."""
    from provisioner.worker import Worker

    config = _configure()
    stop = threading.Event()
    _stop_on_signals(stop)
    Worker(config).run_forever(stop)
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Archive then destroy stores past their deletion date."""
    from pony.orm import db_session, select

    from provisioner import lifecycle
    from provisioner.models import Instance, Job
    from provisioner.worker import drain

    config = _configure()
    with db_session:
        names = lifecycle.schedule_deletions()
    print(f"cleanup: {len(names)} store(s) past their deletion date"
          + (f": {', '.join(names)}" if names else ""))
    drain(config, timeout=args.timeout)
    failed = 0
    with db_session:
        for name in names:
            instance = select(i for i in Instance if i.subdomain == name).order_by(
                lambda i: i.id).first()
            if instance.status == lifecycle.DESTROYED:
                print(f"  {name}: archived to {instance.archive_path}, destroyed")
            else:
                failed += 1
                job = select(j for j in Job if j.instance == instance and j.kind == "destroy"
                             ).order_by(lambda j: j.id).first()
                print(f"  {name}: NOT destroyed: {job.last_error if job else instance.status}")
    print(f"cleanup: {len(names) - failed} destroyed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="provisioner", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="web service + worker in one process")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="run the job worker only")
    worker.set_defaults(func=cmd_worker)
    cleanup = sub.add_parser("cleanup", help="archive then destroy stores past deletion date")
    cleanup.add_argument("--timeout", type=float, default=1800)
    cleanup.set_defaults(func=cmd_cleanup)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
