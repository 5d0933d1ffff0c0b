"""Run a heavy check on untrusted files in a child process bounded in CPU time, memory and wall time.

Building a network from a received bundle's arguments, loading its weights and running its exported
copies take whatever time and memory the bundle's sizes ask for. The child gets ``RLIMIT_CPU`` and
``RLIMIT_AS`` (the address space it already maps when forked plus a budget: torch maps about 1 GB
of libraries before it allocates anything, so a plain cap would refuse it nothing or everything)
and is killed at a wall-clock deadline. It works in an empty temporary folder, confined to it and
the files it is given to read (``confine``). A breach comes back
as one line naming the step, never as a hang or a traceback.

Children are forked from a server process that has imported torch once (``forkserver`` with
preloading), so each check starts in a fraction of a second and shares no state with the caller.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import signal
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from medtl.errors import first_line
from medtl.fileio import size_text


@dataclass(frozen=True)
class Limits:
    """What one child may use: CPU seconds, bytes of memory beyond what it maps when it starts, and
    seconds of wall time (above the CPU time: the machine may be shared)."""

    cpu_seconds: int = 60
    memory_bytes: int = 2 << 30
    wall_seconds: int = 120


@dataclass
class Outcome:
    """What the child sent, in order, and the breach that stopped it (one line) or None."""

    items: list[Any] = field(default_factory=list)
    step: str = ""
    breach: str | None = None


class Channel:
    """The child's side: ``step`` names what it starts (a breach names it), ``put`` sends a result."""

    def __init__(self, conn: Connection):
        self._conn = conn

    def step(self, name: str) -> None:
        self._conn.send(("step", name))

    def put(self, item: Any) -> None:
        self._conn.send(("item", item))


def _mapped_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is Python's or torch's way of saying an allocation failed (at the limit)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "std::bad_alloc" in text


def _child(
    conn: Connection, job: Callable[..., None], args: tuple, limits: Limits, workdir: str, reads: tuple[str, ...]
) -> None:
    from medtl.bundle.confine import confined  # imports MONAI: only in the child

    os.chdir(workdir)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))
    if os.path.exists("/proc/self/statm"):  # Linux; elsewhere only the CPU and wall limits hold
        cap = _mapped_bytes() + limits.memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        with confined(workdir, inputs=reads):
            job(Channel(conn), *args)
    except Exception as exc:  # noqa: BLE001 - whatever the untrusted input made fail is reported as one line
        if out_of_memory(exc):
            conn.send(("memory", ""))
        else:
            conn.send(("error", first_line(exc)))
    else:
        conn.send(("done", ""))


def _context(preload: list[str]) -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)  # takes effect when the server first starts
    return context


@contextlib.contextmanager
def _main_left_alone() -> Iterator[None]:
    """Start children without re-running the caller's main script in them, as multiprocessing
    otherwise does: the job needs nothing of it, and a script without a ``__main__`` guard (or one
    read from stdin) would run again or fail there. A main module named ``__main__`` is skipped."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    main.__spec__ = types.SimpleNamespace(name="__main__")
    try:
        yield
    finally:
        main.__spec__ = spec


def run_limited(
    job: Callable[..., None], *args: Any, what: str, limits: Limits = Limits(), reads: Sequence[str] = ()
) -> Outcome:
    """Run ``job(channel, *args)`` in a bounded child; ``job`` must be a module-level function.
    The child is confined (``confine.confined``): it writes only its temporary folder and reads
    only ``reads`` besides it and the Python installation.

    ``what`` names the check in a breach ("network check exceeded 60 s of CPU time while loading
    models/model.pt"). The items the child ``put`` before a breach are kept.
    """
    context = _context(["torch", job.__module__])
    outcome = Outcome()
    receive, send = context.Pipe(duplex=False)
    status, detail = "", ""
    with tempfile.TemporaryDirectory(prefix="medtl-sandbox-") as workdir:
        child = context.Process(
            target=_child,
            args=(send, job, args, limits, workdir, tuple(os.path.abspath(r) for r in reads)),
            daemon=True,
        )
        with _main_left_alone():
            child.start()
        send.close()
        deadline = time.monotonic() + limits.wall_seconds
        while not status:
            left = deadline - time.monotonic()
            if left <= 0:
                status = "wall"
                break
            if not receive.poll(min(left, 1.0)):
                continue
            try:
                kind, value = receive.recv()
            except EOFError:  # the child died without a word: a signal (CPU limit, a crash)
                status = "died"
                break
            if kind == "step":
                outcome.step = value
            elif kind == "item":
                outcome.items.append(value)
            else:
                status, detail = kind, value
        if child.is_alive() and status != "done":
            child.kill()
        child.join(10)
        receive.close()
    while_ = f" while {outcome.step}" if outcome.step else ""
    if status == "wall":
        outcome.breach = f"{what} did not finish within {limits.wall_seconds} s{while_}; stopped"
    elif status == "memory":
        outcome.breach = f"{what} exceeded {size_text(limits.memory_bytes)} of memory{while_}"
    elif status == "error":
        outcome.breach = f"{what} failed{while_} ({detail})"
    elif status == "died":
        code = child.exitcode or 0
        if -code in (signal.SIGXCPU, signal.SIGKILL):
            outcome.breach = f"{what} exceeded {limits.cpu_seconds} s of CPU time{while_}"
        else:
            name = signal.Signals(-code).name if code < 0 else f"exit status {code}"
            limit = size_text(limits.memory_bytes)
            outcome.breach = f"{what} crashed ({name}){while_}, within a memory limit of {limit}"
    return outcome


__all__ = ["Channel", "Limits", "Outcome", "out_of_memory", "run_limited"]
