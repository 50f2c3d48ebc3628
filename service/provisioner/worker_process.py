"""`serve`'s worker in a process of its own. In one process the worker's Pony work
and Ansible bookkeeping held the GIL the web threads need: webhook p99 at 200 req/s
while the worker applied them was 112 ms in one process, 16 ms apart (bench/run, 2
CPUs). A webhook or the scheduler still wakes it at once (a byte down a pipe); it
dies with `serve` (PR_SET_PDEATHSIG), so a killed service leaves no worker behind to
race the next one; and `serve` starts it again if it dies alone."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("provisioner.worker")

PR_SET_PDEATHSIG = 1
# A worker that lived this long before dying is restarted at once; one dying
# sooner waits, doubling up to RESTART_MAX_SECONDS.
HEALTHY_SECONDS = 60.0
RESTART_MAX_SECONDS = 60.0


def worker_argv(wake_fd: int) -> list[str]:
    return [sys.executable, "-m", "provisioner.cli", "worker", "--wake-fd", str(wake_fd),
            "--parent-pid", str(os.getpid())]


def supervise(stop: threading.Event, wake: threading.Event, grace_seconds: float,
              argv=worker_argv) -> threading.Thread:
    """Run the worker process until `stop`; join the thread for a graceful stop (the
    worker gets SIGTERM and `grace_seconds` + 30 to end its run)."""
    thread = threading.Thread(target=_supervise, args=(stop, wake, grace_seconds, argv),
                              name="provisioner-worker-process", daemon=True)
    thread.start()
    return thread


def _supervise(stop: threading.Event, wake: threading.Event, grace_seconds: float,
               argv) -> None:
    # PR_SET_PDEATHSIG fires when the *thread* that started the child ends: this one
    # lives as long as the child.
    delay = 1.0
    while not stop.is_set():
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            child = subprocess.Popen(argv(read_fd), pass_fds=(read_fd,))
        finally:
            os.close(read_fd)
        started = time.monotonic()
        try:
            while child.poll() is None and not stop.is_set():
                if wake.wait(0.5):
                    wake.clear()
                    _poke(write_fd)
            if stop.is_set():
                _end(child, grace_seconds + 30)
                return
        finally:
            os.close(write_fd)
        lived = time.monotonic() - started
        delay = 1.0 if lived >= HEALTHY_SECONDS else min(delay * 2, RESTART_MAX_SECONDS)
        log.error("worker process %d exited (rc %s) after %.0f s; starting it again in %.0f s",
                  child.pid, child.returncode, lived, delay)
        stop.wait(delay)


def _poke(write_fd: int) -> None:
    # A full pipe already holds a wake-up; a closed one is a worker that died.
    with contextlib.suppress(BlockingIOError, BrokenPipeError):
        os.write(write_fd, b"w")


def _end(child: subprocess.Popen, timeout: float) -> None:
    """SIGTERM: the worker lets its run finish or cancels it (STOP_GRACE_SECONDS)."""
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        log.error("worker process %d still running %.0f s after SIGTERM; killing it",
                  child.pid, timeout)
        child.kill()
        child.wait()


def follow_parent(wake_fd: int, parent_pid: int, stop: threading.Event,
                  wake: threading.Event) -> None:
    """In the worker: die with `serve`, and turn its pipe's bytes into wake-ups (its
    end of file, `serve` gone or done, into a stop)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # serve died before the line above
        os._exit(1)

    def listen() -> None:
        while os.read(wake_fd, 512):
            wake.set()
        stop.set()
        wake.set()

    threading.Thread(target=listen, name="provisioner-worker-wake", daemon=True).start()
