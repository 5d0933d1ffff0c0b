"""Confine what a received bundle's components do on disk, on the network and with processes
while it runs.

The audit (``medtl.bundle.audit``) reads a config's text; what allowed components then do with the
values is checked here, at the moment they do it. Inside ``confined(...)`` a Python audit hook
(PEP 578) sees every file this process and its forked DataLoader workers open, rename, remove,
create or list, and refuses, with a ``PermissionError`` that is also a ``MedtlError``:

- a write outside the bundle, the run's output folders and a private temporary folder;
- a read outside those, the run's declared inputs and the Python installation itself;
- any new program (``subprocess``, ``os.system``, ``exec*``), any network connection and any
  foreign library loaded with ``ctypes``.

Libraries that read or write through C (ITK's readers, ``torch.save`` to a path) are not seen by the
hook, so ``check`` is also called where such paths are known: medtl's components and the thin
wrappers of MONAI's writers and readers in ``medtl.bundle.confined``, when they are built.

Refusals are recorded as well as raised: a library that catches the error and goes on (MONAI tries
its readers in turn) does not hide it; ``confined`` raises the first one when the run ends.
"""

from __future__ import annotations

import contextlib
import inspect
import multiprocessing.util
import os
import socket
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import monai.data
import monai.handlers
import monai.transforms

from medtl.bundle.audit import bare_target
from medtl.errors import MedtlError


class ConfinementError(MedtlError, PermissionError):
    """An access a confined run may not make. A ``PermissionError`` too, so libraries that handle
    a read-only disk (a cache they cannot write) behave as they would there."""


#: Audit events that start programs, open connections or load foreign code: never while confined.
_DENIED_EVENTS = {
    "subprocess.Popen": "starts a program",
    "os.system": "starts a program",
    "os.exec": "starts a program",
    "os.posix_spawn": "starts a program",
    "os.spawn": "starts a program",
    "os.startfile": "starts a program",
    "pty.spawn": "starts a program",
    "socket.getaddrinfo": "looks up a network address",
    "socket.gethostbyname": "looks up a network address",
    "ctypes.dlopen": "loads a native library",
    "urllib.Request": "downloads",
    "ftplib.connect": "opens a network connection",
    "smtplib.connect": "opens a network connection",
    "webbrowser.open": "starts a program",
}
#: Audit events naming paths: (argument positions written, argument positions read).
_PATH_EVENTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "os.rename": ((0, 1), ()),
    "os.remove": ((0,), ()),
    "os.rmdir": ((0,), ()),
    "os.mkdir": ((0,), ()),
    "os.symlink": ((1,), ()),  # (src, dst): a link written at dst
    "os.link": ((0, 1), ()),
    "os.truncate": ((0,), ()),
    "os.chmod": ((0,), ()),
    "os.chown": ((0,), ()),
    "os.utime": ((0,), ()),
    "os.chflags": ((0,), ()),
    "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()),
    "shutil.copyfile": ((1,), (0,)),
    "shutil.copymode": ((1,), (0,)),
    "shutil.copystat": ((1,), (0,)),
    "shutil.copytree": ((1,), (0,)),
    "shutil.move": ((0, 1), ()),
    "shutil.rmtree": ((0,), ()),
    "shutil.make_archive": ((0,), ()),
    "shutil.unpack_archive": ((1,), (0,)),
    "os.listdir": ((), (0,)),
    "os.scandir": ((), (0,)),
    "os.chdir": ((), (0,)),
    "glob.glob": ((), (0,)),
    "os.listxattr": ((), (0,)),
    "os.getxattr": ((), (0,)),
}
#: Socket events, judged by their address: only a local socket file in a folder the run may write
#: (DataLoader workers hand tensors back over one in multiprocessing's temporary folder).
_SOCKET_EVENTS = ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _system_roots() -> tuple[Path, ...]:
    """What any Python program reads: its installation, its packages, the OS's files."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(v for k, v in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib", "purelib", "platlib"))
    for name in ("medtl", "monai", "torch", "numpy", "ignite"):  # packages that may live outside the prefix
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            paths.add(str(Path(module.__file__).parent))
    paths.update(("/usr", "/lib", "/lib64", "/bin", "/etc", "/proc", "/sys", "/dev/urandom", "/dev/null"))
    return tuple(Path(os.path.realpath(p)) for p in paths if p)


def _text(path: Any) -> str | None:
    """``path`` as text, or None for what names no path (a descriptor)."""
    if isinstance(path, int) or path is None:
        return None
    try:
        return os.fsdecode(path)
    except TypeError:
        return None


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


@dataclass
class Confinement:
    """Folders a run may write (``write``), and files or folders it may also read (``read``).

    A path is judged by where it really leads (``realpath``): a link the bundle made in a folder it
    may write leads nowhere else. A read is also allowed by the path as written when that lies in
    a declared input (``inputs``), which the run may only read: links there are the site's own (an
    inbox of links into storage). ``/proc/self/root/...`` and the like are judged by where they lead.
    """

    write: tuple[Path, ...]
    read: tuple[Path, ...]
    inputs: tuple[Path, ...] = ()
    refused: list[str] = field(default_factory=list)

    def allows(self, path: str, *, write: bool) -> bool:
        real = Path(os.path.realpath(path))
        if _inside(real, self.write):
            return True
        return not write and (_inside(real, self.read) or _inside(Path(os.path.abspath(path)), self.inputs))

    def check(self, path: str | os.PathLike, *, write: bool, what: str = "") -> Path:
        """``path`` made absolute; raises ``ConfinementError`` (and records it) when the run may
        not ``write`` (or read) it. ``what`` names the component or argument for the message."""
        text = _text(path)
        if text is None:
            return Path(path)
        absolute = Path(os.path.abspath(text))
        if not self.allows(text, write=write):
            raise self.refusal(
                f"{what + ': ' if what else ''}{'writes' if write else 'reads'} {_shown(absolute)}, outside the "
                f"bundle and the run's {'output' if write else 'input and output'} folders"
            )
        return absolute

    def refusal(self, reason: str) -> ConfinementError:
        """The error for ``reason``, recorded so that a library swallowing it does not hide it."""
        self.refused.append(reason)
        return ConfinementError(
            f"refused: {reason}",
            hint="a received bundle runs confined; give the folders it needs as --input_dir/--output_dir",
        )


def _shown(path: Path) -> str:
    """A refused path, named without its folders (no site paths in logs)."""
    return f"'.../{path.name}'" if path.name else "'/'"


_active: Confinement | None = None
_installed = False
_busy = threading.local()


def active() -> Confinement | None:
    """The confinement of the run in progress, if any."""
    return _active


def check(path: str | os.PathLike, *, write: bool, what: str = "") -> Path:
    """``path`` resolved, refused when a confined run may not read (or ``write``) it; unchanged
    outside a confined run. Components call it for the paths they are given, when built."""
    if _active is None:
        return Path(path)
    return _active.check(path, write=write, what=what)


def _open_writes(args: tuple) -> bool:
    mode, flags = (args[1], args[2]) if len(args) >= 3 else (None, 0)
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(isinstance(flags, int) and flags & _WRITE_FLAGS)


def _hook(event: str, args: tuple) -> None:
    confinement = _active
    if confinement is None or getattr(_busy, "on", False):
        return
    if event == "open":
        path = _text(args[0])
        if len(args) > 1 and args[1] is None and path is not None and not os.path.isabs(path):
            raise confinement.refusal("os.open of a relative path (with dir_fd it is relative to any folder)")
        paths = [(args[0], _open_writes(args))]
    elif event in _PATH_EVENTS:
        written, read = _PATH_EVENTS[event]
        paths = [(args[i], True) for i in written if i < len(args)] + [(args[i], False) for i in read if i < len(args)]
    elif event in _DENIED_EVENTS:
        raise confinement.refusal(f"{event} {_DENIED_EVENTS[event]}")
    elif event in _SOCKET_EVENTS:
        sock, address = args[0], args[1] if len(args) > 1 else None
        unix = getattr(sock, "family", None) == socket.AF_UNIX
        if unix and address is None:
            return  # a local socket connected already, judged when it connected
        if not (unix and isinstance(address, str | bytes)) or os.fsdecode(address).startswith("\0"):
            raise confinement.refusal(f"{event} opens a network connection")
        paths = [(address, True)]
    else:
        return
    _busy.on = True
    try:
        for path, write in paths:
            if event == "glob.glob" and isinstance(path, str | bytes):
                path = os.path.dirname(os.fsdecode(path).split("*")[0].split("?")[0].split("[")[0]) or "."
            text = _text(path)
            if text is None:  # a descriptor: judged when it was opened
                continue
            if event in ("os.listdir", "os.scandir") and _on_import_path(text):
                continue  # Python's import system lists the folders it imports from
            confinement.check(text, write=write, what=event)
    finally:
        _busy.on = False


def _on_import_path(folder: str) -> bool:
    where = os.path.abspath(folder)
    return any(os.path.abspath(entry or ".") == where for entry in sys.path if isinstance(entry, str))


def _install() -> None:
    global _installed
    if not _installed:
        sys.addaudithook(_hook)  # cannot be removed: inactive (one global read) outside ``confined``
        _installed = True


@contextlib.contextmanager
def confined(
    bundle_root: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    outputs: Iterable[str | os.PathLike] = (),
) -> Iterator[Confinement]:
    """Run the body confined to ``bundle_root`` (read and write), ``outputs`` (read and write) and
    ``inputs`` (read only), plus a private temporary folder that becomes ``tempfile``'s default.
    Raises ``ConfinementError`` at the end for a refusal the body swallowed."""
    global _active
    if _active is not None:  # nested (a component running a check inside a confined run): the outer one holds
        yield _active
        return
    outputs = [Path(p) for p in outputs]
    for folder in outputs:
        folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medtl-confined-") as tmp:
        workers = multiprocessing.util.get_temp_dir()  # this process's own, where workers' sockets go
        write = tuple(Path(os.path.realpath(p)) for p in (bundle_root, *outputs, tmp, workers, "/dev/null"))
        inputs = tuple(Path(f(p)) for p in inputs for f in (os.path.realpath, os.path.abspath))
        confinement = Confinement(write=write, read=inputs + _system_roots(), inputs=inputs)
        saved_tempdir, saved_env = tempfile.tempdir, {k: os.environ.get(k) for k in ("TMPDIR", "TEMP", "TMP")}
        saved_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no .pyc beside the packages
        tempfile.tempdir = tmp
        os.environ.update(TMPDIR=tmp, TEMP=tmp, TMP=tmp)
        _install()
        _active = confinement
        try:
            yield confinement
        finally:
            _active = None
            tempfile.tempdir, sys.dont_write_bytecode = saved_tempdir, saved_bytecode
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if confinement.refused:
            raise ConfinementError(f"refused: {confinement.refused[0]}", hint="the bundle tried to reach outside")


def _checked_at_build(cls: type, paths: dict[str, bool]) -> type:
    """``cls`` whose path arguments (name: written?) are checked when it is built: the error comes
    before any work, and covers what its library then does in C (``torch.save`` to a path)."""
    signature = inspect.signature(cls)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        given = signature.bind_partial(*args, **kwargs).arguments
        for name, write in paths.items():
            if given.get(name) not in (None, ""):
                check(given[name], write=write, what=f"{cls.__name__}({name})")
        cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": f"MONAI's {cls.__name__}, confined."})


CheckpointSaver = _checked_at_build(monai.handlers.CheckpointSaver, {"save_dir": True})
CheckpointLoader = _checked_at_build(monai.handlers.CheckpointLoader, {"load_path": False})
ClassificationSaver = _checked_at_build(monai.handlers.ClassificationSaver, {"output_dir": True})
MetricsSaver = _checked_at_build(monai.handlers.MetricsSaver, {"save_dir": True})
TensorBoardStatsHandler = _checked_at_build(monai.handlers.TensorBoardStatsHandler, {"log_dir": True})
PersistentDataset = _checked_at_build(monai.data.PersistentDataset, {"cache_dir": True})


class LoadImaged(monai.transforms.LoadImaged):
    """MONAI's ``LoadImaged``, checking each file before a reader opens it: ITK's readers read in C,
    where the audit hook does not see them."""

    def __call__(self, data: Any, reader: Any = None) -> Any:
        for key in self.key_iterator(dict(data)):
            files = data[key] if isinstance(data[key], list | tuple) else [data[key]]
            for file in files:
                if isinstance(file, str | os.PathLike):
                    check(file, write=False, what="LoadImaged")
        return super().__call__(data, reader)


#: MONAI components a received bundle may name whose arguments are paths, and their confined forms.
CONFINED_TARGETS = {
    **{
        f"monai.handlers.{name}": f"{__name__}.{name}"
        for name in ("CheckpointSaver", "CheckpointLoader", "ClassificationSaver", "MetricsSaver")
    },
    "monai.handlers.TensorBoardStatsHandler": f"{__name__}.TensorBoardStatsHandler",
    "monai.data.PersistentDataset": f"{__name__}.PersistentDataset",
    "monai.transforms.LoadImaged": f"{__name__}.LoadImaged",
}


def retarget(config: Any) -> Any:
    """``config`` (a parsed bundle config, changed in place) with MONAI's path-taking components
    replaced by their confined forms, so a run builds those."""
    if isinstance(config, dict):
        target = config.get("_target_")
        if isinstance(target, str) and "." not in target:  # a bare name, as MONAI's locator finds it
            target = bare_target(target) or target
        if target in CONFINED_TARGETS:
            config["_target_"] = CONFINED_TARGETS[target]
        for value in config.values():
            retarget(value)
    elif isinstance(config, list):
        for value in config:
            retarget(value)
    return config


__all__ = [
    "CONFINED_TARGETS",
    "CheckpointLoader",
    "CheckpointSaver",
    "ClassificationSaver",
    "Confinement",
    "ConfinementError",
    "LoadImaged",
    "MetricsSaver",
    "PersistentDataset",
    "TensorBoardStatsHandler",
    "active",
    "check",
    "confined",
    "retarget",
]
