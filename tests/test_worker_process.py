"""`serve`'s worker process (provisioner.worker_process): woken through its pipe,
started again when it dies alone, stopped with SIGTERM, and gone when `serve` dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from provisioner import worker_process
from provisioner.testing.faults import poll

SERVICE = str(Path(__file__).resolve().parents[1] / "service")

# Stands in for `provisioner worker`: follows its parent like the real one, notes
# each wake-up and its SIGTERM in a file.
FAKE_WORKER = textwrap.dedent("""
    import os, signal, sys, threading
    sys.path.insert(0, sys.argv[4])
    from provisioner.worker_process import follow_parent
    wake_fd, parent, notes = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    stop, wake = threading.Event(), threading.Event()
    def note(text):
        with open(notes, "a") as f:
            f.write(f"{os.getpid()} {text}\\n")
    signal.signal(signal.SIGTERM, lambda *_: (note("term"), stop.set(), wake.set()))
    follow_parent(wake_fd, parent, stop, wake)
    note("started")
    while not stop.is_set():
        if wake.wait(5) and not stop.is_set():
            wake.clear()
            note("woken")
""")


def notes_of(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    return [(int(pid), text) for pid, text in
            (line.split(" ", 1) for line in path.read_text().splitlines())]


def fake_argv(notes: Path):
    return lambda fd: [sys.executable, "-c", FAKE_WORKER, str(fd), str(os.getpid()),
                       str(notes), SERVICE]


def test_woken_restarted_when_it_dies_alone_and_stopped_with_sigterm(tmp_path, monkeypatch):
    monkeypatch.setattr(worker_process, "RESTART_MAX_SECONDS", 0.2)
    notes = tmp_path / "notes"
    stop, wake = threading.Event(), threading.Event()
    thread = worker_process.supervise(stop, wake, 1, argv=fake_argv(notes))
    try:
        first = poll(lambda: [p for p, t in notes_of(notes) if t == "started"], 20, "a worker")[0]
        wake.set()
        poll(lambda: (first, "woken") in notes_of(notes), 20, "the wake-up to reach it")

        os.kill(first, signal.SIGKILL)
        second = poll(lambda: [p for p, t in notes_of(notes) if t == "started" and p != first],
                      20, "a new worker after the first died")[0]
        wake.set()
        poll(lambda: (second, "woken") in notes_of(notes), 20, "the new worker woken")
    finally:
        stop.set()
        thread.join(40)
    assert not thread.is_alive()
    assert (second, "term") in notes_of(notes), "the worker was not stopped with SIGTERM"


def test_the_worker_dies_with_its_parent(tmp_path):
    """serve killed with -9: its worker must not live on to race the next serve's."""
    notes = tmp_path / "notes"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {SERVICE!r})
        from provisioner import worker_process
        argv = lambda fd: [sys.executable, "-c", {FAKE_WORKER!r}, str(fd),
                           str(__import__("os").getpid()), {str(notes)!r}, {SERVICE!r}]
        worker_process.supervise(threading.Event(), threading.Event(), 1, argv=argv)
        threading.Event().wait()
    """)])
    try:
        child = poll(lambda: [p for p, t in notes_of(notes) if t == "started"], 20, "a worker")[0]
        parent.kill()
        parent.wait(10)
        poll(lambda: not Path(f"/proc/{child}").exists()
             or b") Z" in Path(f"/proc/{child}/stat").read_bytes(),
             20, "the worker to die with its parent")
    finally:
        parent.kill()
        parent.wait(10)
