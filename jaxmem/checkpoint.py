"""Run directories: orbax checkpoints of a training state plus the configuration behind it.

The one module that knows orbax. A run directory holds

* ``config.json`` — what the run is (plan fingerprint, data shapes, model structure,
  optimizer state structure, batch size, seed, user config), written when the run starts;
* ``checkpoints/<epoch>/`` — orbax ``CheckpointManager`` steps (``max_to_keep`` newest
  kept), each with the full training state (any pytree of arrays, PRNG keys included)
  and a JSON history of per-epoch metrics.

The configuration also records the software and device it was written under
(``provenance``: :func:`provenance`), which is never compared: float rounding depends on
the jax, jaxlib, flax and optax versions (and, for a CPU device spanning several cores,
on their number), so a run resumed under other versions (or cores) than its checkpoint
was saved under continues with a ``UserWarning`` naming both (its numbers then match
neither version's uninterrupted run, to float rounding).

Opening a run directory with another configuration raises :class:`ConfigMismatchError`
naming every field that differs, so states from different plans, models or shapes are
never mixed; one whose ``config.json`` is missing (next to checkpoints) or unreadable is
refused too. A configuration with no checkpoint behind it (a run stopped before its
first) has no state to mix: another configuration replaces it. A checkpoint whose files
were damaged raises :class:`CheckpointDamagedError` instead of falling back to an older
one: nothing is skipped or overwritten silently.

Saves are asynchronous (orbax writes in a background thread into a temporary directory
and renames it when complete), so a process killed mid-save leaves the previous
checkpoint as the latest one. A save that fails (full disk, read-only folder) raises an
``OSError`` naming the run directory, the checkpoint not written and the one kept; one
whose run directory (or ``checkpoints`` folder) was removed or moved during the run
raises ``FileNotFoundError`` saying so. orbax's own reports of such a failure (its log
records and tracebacks from every thread) are kept off stderr while the checkpoints are
open.

The other files of a run and of its results are written whole or not at all
(:func:`_write_atomically`).

A run holds its directory for as long as it works in it (:func:`run_lock`, an advisory
``flock`` on ``DIR/.jaxmem-lock``): a second run started in the same directory meanwhile
is refused with :class:`RunDirectoryBusyError` naming the holder, before it reads or writes
anything. The kernel drops the lock when the holder's process ends, however it ends, so a
killed run leaves no stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, NoReturn

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from jaxmem import _warn

__all__ = [
    "RunCheckpoints", "ConfigMismatchError", "CheckpointDamagedError", "fingerprint_array", "describe_tree",
    "latest_epoch", "run_lock", "RunDirectoryBusyError", "provenance", "check_x64",
]

_FORMAT = 1

# Where orbax keeps the numbered checkpoints inside a run directory.
_STEPS_DIR = "checkpoints"

# The lock file of a run directory (removed when the run releases it).
_LOCK_FILE = ".jaxmem-lock"

# The configuration's record of the software and device it was written under: never
# compared (a run resumes under other versions, with a warning), and absent from the
# configurations written before it was recorded.
PROVENANCE_KEY = "provenance"

# The packages whose versions change training's float rounding (a resume across them warns).
_ROUNDING_PACKAGES = ("jax", "jaxlib", "flax", "optax")

# (run directory, epoch) whose version change was warned of: once per process.
_warned_versions: set[tuple[str, int]] = set()


def provenance() -> dict[str, Any]:
    """The software and device this process computes with, as configurations record it.

    Returns:
      ``{"python", "jax", "jaxlib", "flax", "optax": version strings (None for a package
      that is not installed), "platform": e.g. "cpu", "gpu", "device_kind": e.g. "cpu",
      "NVIDIA H200"}`` (of ``jax.devices()[0]``), and on CPUs ``"cpu_cores"``: the cores
      the process may run on (:func:`jaxmem.mesh.cpu_cores`), over which XLA splits a CPU
      device's products, so that a device spanning several cores rounds by their number.
    """
    import importlib.metadata
    import platform

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    from jaxmem.mesh import cpu_cores

    device = jax.devices()[0]
    return {"python": platform.python_version(), "jax": jax.__version__,
            **{p: version(p) for p in _ROUNDING_PACKAGES[1:]},
            "platform": device.platform, "device_kind": device.device_kind,
            **({"cpu_cores": cpu_cores()} if device.platform == "cpu" else {})}


def _version_change(then: Any, now: dict[str, Any], devices: Any = None) -> str | None:
    """``"jax 0.10.2 -> 0.11.2, ..."`` for the rounding packages whose versions differ
    between two :func:`provenance` records, and ``"CPU cores 2 -> 1"`` where the training
    ran on fewer CPU devices (``devices``) than cores, so that a device's products were
    split over the cores (one device per core rounds alike on any number); None if
    nothing differs or ``then`` is not a record."""
    if not isinstance(then, dict):
        return None
    changed = [f"{p} {then.get(p)} -> {now.get(p)}" for p in _ROUNDING_PACKAGES if then.get(p) != now.get(p)]
    cores = (then.get("cpu_cores"), now.get("cpu_cores"))
    if (None not in cores and cores[0] != cores[1] and isinstance(devices, int)
            and devices < max(cores)):
        changed.append(f"CPU cores {cores[0]} -> {cores[1]}, over which {devices} training device(s) split "
                       "their products")
    return ", ".join(changed) or None


def _x64_mismatch(stored: dict[str, Any], config: dict[str, Any]) -> str | None:
    """What to do about a run directory trained under another ``jax_enable_x64`` setting
    than this run's (:mod:`jaxmem.ensemble` records ``"jax_enable_x64": true`` when it is on),
    or None if the settings agree."""
    then, now = bool(stored.get("jax_enable_x64", False)), bool(config.get("jax_enable_x64", False))
    if then == now:
        return None
    cure = ("resume it with JAX_ENABLE_X64=1 in the environment, or jax.config.update('jax_enable_x64', True) "
            "before any JAX operation" if then else
            "resume it with JAX_ENABLE_X64 unset (or 0) and without jax.config.update('jax_enable_x64', True)")
    return (f"was trained with jax_enable_x64 {'on' if then else 'off'} and this process has it "
            f"{'on' if now else 'off'} (float arithmetic outside jaxmem's control, e.g. optax's, rounds otherwise, "
            f"so a run resumes only under the setting it began with): {cure}")


def _path(path: str | os.PathLike) -> str:
    """A path argument as a string, ``~`` expanded (a folder named ``~`` is never meant)."""
    return os.path.expanduser(os.fspath(path))


def check_x64(run_dir: str | os.PathLike) -> None:
    """Refuse, before anything is opened or written, to resume the checkpoints in
    ``run_dir`` under another ``jax_enable_x64`` setting than they were trained under.

    For a look before a run (:func:`jaxmem.memorization` checks it before saying that it
    resumes); :class:`RunCheckpoints` refuses it too. Nothing to check (no checkpoint,
    no ``config.json``) passes.

    Raises:
      ConfigMismatchError: the setting differs; the message says how to match it.
    """
    run_dir = _path(run_dir)
    path = os.path.join(run_dir, "config.json")
    if not _epochs_on_disk(run_dir) or not os.path.isfile(path):
        return
    mismatch = _x64_mismatch(_read_config(path), {"jax_enable_x64": True} if jax.config.jax_enable_x64 else {})
    if mismatch:
        raise ConfigMismatchError(f"run directory {os.path.abspath(run_dir)} {mismatch}")


def latest_epoch(run_dir: str | os.PathLike) -> int | None:
    """Epoch of the newest complete checkpoint in ``run_dir``, or None; opens nothing.

    For a look before a run (to report that it will resume, or refuse it) without
    :class:`RunCheckpoints`, which checks and writes the configuration.
    """
    return max(_epochs_on_disk(_path(run_dir)), default=None)


def incomplete_note(run_dir: str | os.PathLike, epoch: int) -> str:
    """``""``, or a note for a message about checkpoint ``epoch`` of ``run_dir`` whose
    folder lacks orbax's parts (an empty or partly copied folder, not a checkpoint)."""
    path = os.path.join(_path(run_dir), _STEPS_DIR, str(epoch))
    missing = [part for part in ("state", "history") if not os.path.isdir(os.path.join(path, part))]
    if not missing:
        return ""
    return (f" (but {path} holds no {' or '.join(missing)}: not a whole checkpoint; if it is an empty or "
            "partly copied folder, delete it)")


def _epochs_on_disk(run_dir: str | os.PathLike) -> list[int]:
    """Sorted epochs of the complete checkpoints in ``run_dir`` (directory listing only)."""
    root = os.path.join(run_dir, _STEPS_DIR)
    if not os.path.isdir(root):
        return []
    # orbax writes into a temporary name and renames to the bare step number when done
    return sorted(int(e.name) for e in os.scandir(root) if e.is_dir() and e.name.isdigit())


class RunDirectoryBusyError(OSError):
    """Another run, alive now, works in the run directory (an ``OSError``, as a busy file is)."""


class _Lock:
    """An exclusive ``flock`` on ``directory/.jaxmem-lock``, or nothing where there is none.

    Re-entrant within a thread (a caller holding the directory may call what takes it
    again: the CLI holds it around ``memorization`` and the report); another thread or
    process is refused.
    """

    _held: dict[str, list] = {}  # lock file -> [owning thread's ident, depth]
    _guard = threading.Lock()

    def __init__(self, directory: str, what: str):
        self.fd: int | None = None
        self.nested = False
        self.directory = directory
        self.created_dir = not os.path.lexists(directory)
        os.makedirs(directory, exist_ok=True)
        # One name per folder, however it is reached (symlinks, '..'): the nesting key.
        self.path = os.path.join(os.path.realpath(directory), _LOCK_FILE)
        me = threading.get_ident()
        with _Lock._guard:
            held = _Lock._held.get(self.path)
            if held is not None and held[0] == me:
                held[1] += 1
                self.nested = True
                return
        try:
            import fcntl
        except ImportError:  # Windows: runs are not locked there
            return
        try:
            self.fd = self._acquire(fcntl, what)
        except BaseException:
            self.release()  # e.g. Ctrl-C between the lock and this point: never left held
            raise
        if self.fd is not None:
            with _Lock._guard:
                _Lock._held[self.path] = [me, 1]

    def _acquire(self, fcntl: Any, what: str) -> int | None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    mine = holder.startswith(f"pid {os.getpid()} on {socket.gethostname()},")
                    raise RunDirectoryBusyError(
                        f"{what} {self.directory} is in use by another run ({holder}"
                        f"{': another thread of this process' if mine else ''}); wait for it to end"
                        + (", or use another directory (two runs in one directory would overwrite each other's work)"
                           if what != "results directory" else " (its report is written when it ends)")) from None
                except OSError as e:
                    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without flock
                        os.close(fd)
                        return None
                    raise
                # The holder before us may have removed the file between our open and our
                # lock: then the lock is on a file nobody else will open, and is taken again.
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()}, since "
                                   f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n").encode(), 0)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def release(self) -> None:
        if self.nested:
            with _Lock._guard:
                held = _Lock._held.get(self.path)
                if held is not None:  # (None: the outer hold was released first)
                    held[1] -= 1
            self.nested = False
            return
        if self.fd is not None:
            with _Lock._guard:
                _Lock._held.pop(self.path, None)
            # Removed before it is unlocked, so that nobody locks a file about to go; and
            # only while it is this lock's file: a directory renamed during the run may have
            # a new run's directory, locked by its own file, at its old path by now.
            try:
                # (a folder made read-only or removed meanwhile: the file stays, the lock goes)
                with contextlib.suppress(OSError):
                    here, mine = os.stat(self.path), os.fstat(self.fd)
                    if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                        os.remove(self.path)
            finally:
                os.close(self.fd)
                self.fd = None
        if self.created_dir:  # a run refused before it wrote anything leaves no folder behind
            self.created_dir = False
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)  # only if empty


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, what: str = "run directory") -> Iterator[None]:
    """Hold ``directory`` (created if missing) for one run; refuse it while another run holds it.

    An advisory exclusive ``flock`` on ``directory/.jaxmem-lock``, which names the holder
    (process id, host, start time). The kernel drops it when the holding process ends,
    however it ends (``SIGKILL`` included), so no stale lock is ever left to clear (a
    child forked while it is held shares it until the child ends too). On release the
    lock file is removed (unless another file has taken its path meanwhile: the lock of
    a new run in a directory made where this one was before it was renamed), and a
    directory that the lock created is removed again if it is still empty. Re-entrant
    within a thread: code that holds the directory may call what takes it again
    (``jaxmem run`` holds it around ``memorization`` and the report); another thread or
    process is refused. Where ``fcntl`` or ``flock`` is missing
    (Windows; some network file systems), nothing is locked.

    Args:
      directory: the run (or results) directory.
      what: how the error names it (e.g. ``"out_dir"``).

    Raises:
      RunDirectoryBusyError: another run (in another thread or process) holds ``directory``.
    """
    lock = _Lock(os.path.abspath(_path(directory)), what)
    try:
        yield
    finally:
        lock.release()


class ConfigMismatchError(ValueError):
    """A run directory was written by a run with another configuration."""


class CheckpointDamagedError(ValueError):
    """A checkpoint's files cannot be read back (truncated, overwritten, partly deleted)."""


def fingerprint_array(a: Any) -> str:
    """sha256 (hex) of an array's dtype, shape and bytes: e.g. a plan's ``keep``."""
    a = np.ascontiguousarray(np.asarray(a))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def describe_tree(tree: Any) -> dict[str, str]:
    """``{path: "dtype[shape]"}`` for every array leaf of ``tree`` (structure fingerprint)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[jax.tree_util.keystr(path)] = f"{jax.numpy.dtype(leaf.dtype)}{list(np.shape(leaf))}"
    return out


def _is_key(x: Any) -> bool:
    """Whether ``x`` is a typed PRNG key array (``jax.random.key``), not raw key data."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaf_name(i: int) -> str:
    return f"leaf_{i:05d}"


def _to_saveable(tree: Any) -> dict[str, Any]:
    # Orbax stores plain arrays: typed PRNG keys go in as their raw key data, and the
    # tree as a flat dict so that restoring needs only the caller's own structure.
    leaves = jax.tree.leaves(tree)
    return {_leaf_name(i): jax.random.key_data(x) if _is_key(x) else x for i, x in enumerate(leaves)}


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    data = jax.random.key_data(x) if _is_key(x) else x
    sharding = getattr(data, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(data), data.dtype, sharding=sharding)


class _OrbaxNoise(logging.Filter):
    """Keeps what a failed orbax save scatters over stderr off it while checkpoints are open.

    A save that fails (full disk, a folder removed under it) has orbax log the error with
    its traceback through absl from each of its threads, tensorstore report "Event loop is
    closed" from callbacks onto the event loops orbax has closed (``sys.unraisablehook``),
    and asyncio log "exception was never retrieved" for the futures orbax left behind
    (when they are collected: as late as the raised error that refers to them):
    hundreds of lines, while the failure itself is raised from :meth:`RunCheckpoints.save`,
    ``wait`` or ``close`` (:meth:`RunCheckpoints._raise_failure` words it). Only those are
    dropped, asyncio's for as long as the process lives: orbax's records below ERROR,
    asyncio's about other folders, other packages' records and other unraisable
    exceptions pass. Also dropped: orbax's warning that it removes the unfinished step of
    a save interrupted in an earlier session (the resume starts from the newest complete one).
    """

    _ORBAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__)))  # .../orbax

    def __init__(self) -> None:
        super().__init__()
        self._guard = threading.Lock()
        self._steps_dirs: list[str] = []  # of the open RunCheckpoints
        self._failed: set[str] = set()  # checkpoint folders whose save failed
        self._previous_hook: Any = None

    def hold(self, steps_dir: str) -> None:
        with self._guard:
            if not self._steps_dirs:
                logging.getLogger("absl").addFilter(self)
                logging.getLogger("asyncio").addFilter(self)  # (a second add is no-op)
                self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
            self._steps_dirs.append(steps_dir)

    def failed(self, steps_dir: str) -> None:
        with self._guard:
            self._failed.add(steps_dir)

    def release(self, steps_dir: str) -> None:
        with self._guard:
            self._steps_dirs.remove(steps_dir)
            if not self._steps_dirs:
                logging.getLogger("absl").removeFilter(self)
                if not self._failed:
                    logging.getLogger("asyncio").removeFilter(self)
                if sys.unraisablehook == self._unraisable:  # (not if another hook replaced it since)
                    sys.unraisablehook = self._previous_hook

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "absl":
            if not os.path.abspath(record.pathname).startswith(self._ORBAX_DIR + os.sep):
                return True
            # orbax removing the unfinished step of a save interrupted earlier (a notebook's
            # "interrupt kernel"): the resume restores the newest complete one, as it says.
            unfinished = "Removing existing directory since it is not finalized" in str(record.msg)
            return not (record.levelno == logging.ERROR or unfinished)
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or "exception was never retrieved" not in str(record.msg):
            return True
        with self._guard:  # (hold, release and failed change them from other threads)
            dirs = (*self._steps_dirs, *self._failed)
        return not any(d in str(exc) for d in dirs)

    def _unraisable(self, unraisable: Any) -> None:
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and unraisable.object is None):
            self._previous_hook(unraisable)


_orbax_noise = _OrbaxNoise()

# The errnos of failed writes that a message can name a cure for, in the order they are
# looked for by their text (strerror) in an error that has no errno.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _errno_of(err: BaseException) -> int | None:
    """The errno behind a failed write: of the first ``OSError`` in ``err``'s chain, or read
    from tensorstore's text (``... No space left on device [os_error_code='28']``,
    as orbax raises it in a ``ValueError``); None if there is none."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        text = str(e)
        code = re.search(r"os_error_code='?(\d+)", text)
        if code:
            return int(code.group(1))
        for number in _WRITE_ERRNOS:
            if os.strerror(number) in text:
                return number
        e = e.__cause__ or e.__context__
    return None


class RunCheckpoints:
    """Checkpoints of one training run in ``run_dir``, refusing other configurations.

    The directory is held (:func:`run_lock`) from here until :meth:`close`, so a second
    run cannot open it meanwhile.

    Args:
      run_dir: directory of the run (created if missing).
      config: JSON-serialisable description of the run. If ``run_dir`` already has a
        ``config.json`` and checkpoints, every key must match (:class:`ConfigMismatchError`
        otherwise); keys listed in ``mutable`` (e.g. the number of epochs) may change on
        resume. A ``config.json`` with no complete checkpoint behind it is replaced.
        Stored with ``"format"`` and ``"provenance"`` (:func:`provenance`, never compared)
        added; a resume under other jax, jaxlib, flax or optax versions than the
        checkpoint was saved under warns (``UserWarning``, once per process).
      max_to_keep: newest checkpoints kept.
      mutable: config keys allowed to differ from the stored ones.
      added_later: config keys compared only where the stored configuration has them
        (keys a run directory written before they were recorded lacks).
      hints: ``{key: hint(stored_value) -> str}``: advice appended to a difference in
        ``key`` (e.g. which mesh to pass).

    Raises:
      ConfigMismatchError: ``run_dir`` holds checkpoints of a run of another configuration.
      RunDirectoryBusyError: another run holds ``run_dir`` (it has not closed it).
      ValueError: ``run_dir`` or its ``checkpoints`` entry is not a directory; its
        ``config.json`` is not a JSON object; or it holds checkpoints but no
        ``config.json`` (they cannot be checked against this run). Raised before
        anything is written.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict[str, Any],
        *,
        max_to_keep: int = 3,
        mutable: tuple[str, ...] = (),
        added_later: tuple[str, ...] = (),
        hints: dict[str, Callable[[Any], str]] | None = None,
    ):
        self.run_dir = os.path.abspath(_path(run_dir))
        steps_dir = os.path.join(self.run_dir, _STEPS_DIR)
        for d in (self.run_dir, steps_dir):  # before orbax, which fails on them with thread noise
            if os.path.lexists(d) and not os.path.isdir(d):
                raise ValueError(f"run_dir: {d} exists and is not a directory; use another run directory")
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:  # a parent is a file
            raise ValueError(f"run_dir: cannot create directory {self.run_dir}: {e}") from e
        self._lock = _Lock(self.run_dir, "run_dir")  # held until close()
        self._added_later = tuple(added_later)
        self._hints = dict(hints or {})
        try:
            self._open(config, max_to_keep, mutable)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, config: dict[str, Any], max_to_keep: int, mutable: tuple[str, ...]) -> None:
        # normalise tuples etc.
        config = json.loads(json.dumps({"format": _FORMAT, **config, PROVENANCE_KEY: provenance()}))
        self.config = config
        self._mutable = tuple(mutable)
        self._stored_provenance = None  # of config.json, for checkpoints saved without their configuration
        path = os.path.join(self.run_dir, "config.json")
        epochs = _epochs_on_disk(self.run_dir)
        if os.path.lexists(path):
            stored = _read_config(path)  # a damaged file is named, even with nothing behind it
            if epochs:
                self._check(stored, config, mutable)
                self._stored_provenance = stored.get(PROVENANCE_KEY)
            elif stored != config:
                # A run stopped before its first checkpoint: no state to mix with this run's.
                _write_json(path, config, indent=1)
        elif epochs:
            # A fresh config.json would adopt checkpoints of an unknown run as this one's.
            raise ValueError(
                f"{self.run_dir} holds checkpoints (epochs {_short(epochs)}) but no config.json, so it "
                "cannot be checked against this run; restore config.json or use another directory"
            )
        else:
            _write_json(path, config, indent=1)
        self._steps_dir = steps_dir = os.path.join(self.run_dir, _STEPS_DIR)
        # Handlers named up front so that a checkpoint's metadata can be read before restoring.
        self._manager = ocp.CheckpointManager(
            steps_dir,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "history": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()},
        )
        self._pending: int | None = None  # the epoch of the last save not known to be on disk
        # Which folders these are: orbax recreates a removed one as it goes on writing into it
        # (where a new folder may get the old one's inode number: its newest checkpoint tells).
        self._folders = {path: _identity(path) for path in (self.run_dir, steps_dir)}
        self._newest = max(epochs, default=None)  # the newest checkpoint known to be complete
        self._failure: Exception | None = None  # of a save, once raised
        self._closed = False
        _orbax_noise.hold(steps_dir)  # until close()

    def _check(self, stored: dict, config: dict, mutable: tuple[str, ...], what: str = "") -> None:
        diffs = _differences(stored, config, mutable, self._added_later, self._hints)
        x64 = _x64_mismatch(stored, config)
        if x64 and len(diffs) == 1 and not what:  # the one difference: say how to match it
            raise ConfigMismatchError(f"run directory {self.run_dir} {x64}")
        if diffs:
            more = f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else ""
            raise ConfigMismatchError(
                (what or f"run directory {self.run_dir} was written with another configuration; "
                 "refusing to resume from it (use a new run directory)")
                + ". Differences:\n  " + "\n  ".join(diffs[:12]) + more
            )

    def latest_epoch(self) -> int | None:
        """Epoch of the newest complete checkpoint, or ``None``."""
        return self._manager.latest_step()

    def save(self, epoch: int, state: Any, history: dict[str, Any]) -> None:
        """Start saving ``state`` (pytree of arrays) and ``history`` (JSON) as ``epoch``.

        Asynchronous: returns once the arrays are copied; call :meth:`wait` before
        relying on the files. The run's configuration is saved with it, and checked
        against ``config.json`` first.

        Raises:
          ConfigMismatchError: ``config.json`` now holds another configuration (another
            run replaced it while this one had no checkpoint): nothing is saved.
          OSError: the previous save failed (see :meth:`wait`).
          FileNotFoundError: ``run_dir`` was removed or moved during the run.
        """
        epoch = int(epoch)
        gone = self._gone(epoch, steps=False)  # (a checkpoints folder removed: orbax makes a new one)
        if gone is not None:
            self._failure = gone
            raise gone
        self._check(_read_config(os.path.join(self.run_dir, "config.json")), self.config, self._mutable,
                    what=f"run directory {self.run_dir} now holds another run's configuration (started there "
                         f"while this run had no checkpoint?); refusing to save checkpoint {epoch} under it "
                         "(use a run directory per run)")
        try:
            self._manager.save(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_to_saveable(state)),
                    # A copy: orbax writes the JSON in the background, while the caller goes on
                    # appending to its history (a checkpoint of epoch 1 held 2 epochs' rows).
                    history=ocp.args.JsonSave(json.loads(json.dumps(history))),
                    config=ocp.args.JsonSave(self.config),
                ),
            )
        except Exception as e:  # orbax waits for the previous save first: its failure, or this one's
            self._raise_failure(e, epoch)
        if self._pending is not None:  # complete, then
            self._newest = self._pending
        self._pending = epoch

    def restore(self, like: Any, epoch: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore the checkpoint of ``epoch`` (default: the latest) into ``like``'s structure.

        Args:
          like: a pytree with the structure, shapes, dtypes and shardings to restore
            onto (e.g. a freshly initialised state); PRNG key leaves come back as keys.
          epoch: which checkpoint.

        Returns:
          ``(state, history)``.

        Raises:
          FileNotFoundError: there is no checkpoint.
          ConfigMismatchError: the checkpoint holds other leaves or shapes than ``like``,
            or was saved under another configuration than this run's.
          CheckpointDamagedError: the checkpoint's files cannot be read back; it is left
            as it is (no older checkpoint is used in its place), and the message names
            the earlier checkpoint that deleting it would resume from.
        """
        epoch = self.latest_epoch() if epoch is None else epoch
        if epoch is None:
            raise FileNotFoundError(f"no checkpoint in {self.run_dir}")
        leaves, treedef = jax.tree.flatten(like)
        target = {_leaf_name(i): _abstract(x) for i, x in enumerate(leaves)}
        # The stored leaves first: a checkpoint that reads but does not fit is a mismatch,
        # one that cannot be read (here or in the restore below) is damaged.
        try:
            _read_array_store(os.path.join(self._steps_dir, str(epoch), "state"))
            stored = self._manager.item_metadata(epoch)["state"]
            stored = {k: tuple(v.shape) for k, v in stored.items()}
            # The configuration the checkpoint was saved under (checkpoints of jaxmem
            # before it was saved with them have none: their config.json is all there is).
            saved_under = None
            if os.path.isdir(os.path.join(self._steps_dir, str(epoch), "config")):
                saved_under = self._manager.restore(epoch, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
                saved_under = saved_under["config"]
        except Exception as e:
            raise self._damaged(epoch, e) from e
        if saved_under is not None:  # e.g. saved by another run that shared the directory
            path = os.path.join(self._steps_dir, str(epoch))
            self._check(saved_under, self.config, self._mutable,
                        what=f"checkpoint {epoch} in {self.run_dir} was saved by a run of another configuration "
                             f"than this one and {self.run_dir}/config.json (two runs in one directory?); "
                             f"refusing to resume from it (delete {path}, or use a new run directory)")
        self._warn_if_other_versions(epoch, (saved_under or {}).get(PROVENANCE_KEY, self._stored_provenance))
        diffs = [
            f"{k}: stored {stored.get(k, '<missing>')} vs now {target[k].shape if k in target else '<missing>'}"
            for k in sorted(set(stored) | set(target))
            if k not in stored or k not in target or stored[k] != target[k].shape
        ]
        if diffs:  # structure changed under an unchanged config
            raise ConfigMismatchError(
                f"checkpoint {epoch} in {self.run_dir} does not fit the current state: " + "; ".join(diffs[:5])
                + (f"; ... and {len(diffs) - 5} more" if len(diffs) > 5 else "")
            )
        try:
            out = self._manager.restore(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    history=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:
            raise self._damaged(epoch, e) from e
        restored = out["state"]
        new_leaves = []
        for i, like_leaf in enumerate(leaves):
            x, want = restored[_leaf_name(i)], target[_leaf_name(i)]
            if np.shape(x) != want.shape:
                raise ConfigMismatchError(
                    f"checkpoint {epoch} leaf {i} has shape {np.shape(x)}, "
                    f"the current state {want.shape}"
                )
            if _is_key(like_leaf):
                x = jax.random.wrap_key_data(x, impl=jax.random.key_impl(like_leaf))
            new_leaves.append(x)
        return jax.tree.unflatten(treedef, new_leaves), out["history"]

    def _warn_if_other_versions(self, epoch: int, then: Any) -> None:
        """Warn (once per process) that checkpoint ``epoch``, saved under the software of
        ``then`` (a :func:`provenance` record, or None where none was recorded), is
        resumed under other jax, jaxlib, flax or optax versions, or CPU cores that change
        how its devices' products are split (:func:`_version_change`)."""
        change = _version_change(then, self.config[PROVENANCE_KEY], self.config.get("devices"))
        if change is None or (self.run_dir, int(epoch)) in _warned_versions:
            return
        _warned_versions.add((self.run_dir, int(epoch)))
        _warn.warn(
            f"checkpoint {epoch} in {self.run_dir} was saved under "
            f"{'another setup' if 'CPU cores' in change else 'other versions'} than this process runs "
            f"({change}): a run continued from it matches neither version's uninterrupted run, to float rounding "
            "(to reproduce a run, train it from the start under one set of versions and cores)", UserWarning)

    def _damaged(self, epoch: int, err: Exception) -> CheckpointDamagedError:
        earlier = [s for s in self._manager.all_steps() if s < epoch]
        path = os.path.join(self._steps_dir, str(epoch))
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        first = first if len(first) <= 300 else first[:297] + "..."
        keep = (
            f"the earlier checkpoint {max(earlier)} is kept: deleting {path} resumes from it"
            if earlier else f"there is no earlier checkpoint: deleting {path} starts the run over"
        )
        return CheckpointDamagedError(
            f"checkpoint {epoch} in {self.run_dir} is damaged or unreadable ({type(err).__name__}: {first}); {keep}"
        )

    def wait(self) -> None:
        """Block until every started save is on disk.

        Raises:
          OSError: a save failed (full disk, read-only folder, ...): of its errno (e.g.
            ``ENOSPC``), naming ``run_dir``, with a note (``add_note``) naming the checkpoint
            not written and the one kept; raised from orbax's error. The checkpoints
            already complete are kept, and a rerun resumes from the newest.
          FileNotFoundError: ``run_dir`` or its ``checkpoints`` folder was removed or
            moved during the run.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._raise_failure(e)
        if self._pending is not None:
            self._newest, self._pending = self._pending, None

    def close(self) -> None:
        """Finish pending saves, release orbax's threads and the run directory.

        Raises:
          OSError, FileNotFoundError: a save failed (see :meth:`wait`), unless
            :meth:`save` or :meth:`wait` raised its failure already.
        A second call does nothing.
        """
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self._manager.wait_until_finished()
            except Exception as e:
                reported = self._failure is not None
                with contextlib.suppress(Exception):
                    self._manager.close()  # releases orbax's threads; the failure is raised below
                if not reported:
                    self._raise_failure(e)
            else:
                self._manager.close()
        finally:
            try:
                _orbax_noise.release(self._steps_dir)
            finally:
                self._lock.release()

    def _gone(self, epoch: int | None, steps: bool = True) -> FileNotFoundError | None:
        """The error for the checkpoint of ``epoch`` if ``run_dir`` or (if ``steps``) its
        checkpoints folder is no longer the one opened (removed or moved during the run;
        perhaps recreated since by orbax's save in flight), else None."""
        newest = os.path.join(self._steps_dir, str(self._newest))
        for path, what, gone in (
            (self.run_dir, "run directory", _identity(self.run_dir) != self._folders[self.run_dir]
             or not os.path.lexists(os.path.join(self.run_dir, "config.json"))),
            (self._steps_dir, "checkpoints folder", steps and (
                _identity(self._steps_dir) != self._folders[self._steps_dir]
                or (self._newest is not None and not os.path.isdir(newest)))),
        ):
            if gone:
                return FileNotFoundError(
                    f"{what} {path} was removed or moved during the run, so the checkpoint of "
                    f"{f'epoch {epoch}' if epoch is not None else 'the last epoch'} was not written; "
                    "put it back and rerun to resume from its checkpoints, or rerun to start over")
        return None

    def _raise_failure(self, err: Exception, epoch: int | None = None) -> NoReturn:
        """Raise, from orbax's ``err`` of a save (of ``epoch``) or a wait, :meth:`_gone`'s
        error, an ``OSError`` of the errno behind ``err`` naming ``run_dir`` (with a note
        naming the checkpoint not written and the one kept), or else ``err`` itself."""
        self._failure = err
        _orbax_noise.failed(self._steps_dir)
        on_disk = _epochs_on_disk(self.run_dir)
        lost = min((e for e in (self._pending, epoch) if e is not None and e not in on_disk), default=None)
        self._pending = None
        gone = self._gone(lost)
        if gone is not None:
            raise gone from err
        code = _errno_of(err)
        if code is None:
            raise err
        out = OSError(code, os.strerror(code), self.run_dir)
        cure = {errno.ENOSPC: "free space", errno.EDQUOT: "free space", errno.EROFS: "make it writable",
                errno.EACCES: "make it writable", errno.EPERM: "make it writable"}.get(code, "remove the cause")
        kept = max(on_disk, default=None)
        out.add_note(
            (f"the checkpoint of epoch {lost} was not written; " if lost is not None else "")
            + (f"epoch {kept} is kept: {cure} and rerun to resume" if kept is not None
               else f"no checkpoint is kept yet: {cure} and rerun to start over"))
        raise out from err


def _identity(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the directory ``path``, or None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if os.path.isdir(path) else None


def _read_array_store(state_dir: str) -> None:
    """Read every stored value of a checkpoint's OCDBT array store, one after another.

    Raises tensorstore's error for a damaged store (truncated or overwritten data files,
    manifest, b-tree). Before orbax reads it: orbax reads all arrays at once and, on the
    first error, leaves the other reads to end in "Event loop is closed" tracebacks.
    """
    if not os.path.isfile(os.path.join(state_dir, "manifest.ocdbt")):
        return  # not an OCDBT store (or its manifest is gone): orbax's restore reports it
    store = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": state_dir + os.sep}}).result()
    for key in store.list().result():
        store.read(key).result()


def _differences(stored: dict, config: dict, mutable: tuple[str, ...], added_later: tuple[str, ...] = (),
                 hints: dict[str, Callable[[Any], str]] | None = None) -> list[str]:
    """``"key: stored X vs now Y"`` for every flattened key that differs, ``mutable`` ones,
    the provenance, and ``added_later`` ones the stored configuration lacks aside;
    ``jax_enable_x64`` as on/off, ``hints[key](stored value)`` appended in parentheses."""
    old, new = _flatten(stored), _flatten(config)

    def shown(key: str, conf: dict) -> str:
        if key == "jax_enable_x64":  # recorded only when on
            return "on" if conf.get(key) else "off"
        return _short(conf.get(key, "<missing>"))

    out = []
    for key in sorted(set(old) | set(new)):
        top = key.split(".")[0]
        if (top in mutable or top == PROVENANCE_KEY or (key in added_later and key not in old)
                or old.get(key, "<missing>") == new.get(key, "<missing>")):
            continue
        hint = (hints or {}).get(key)
        out.append(f"{key}: stored {shown(key, old)} vs now {shown(key, new)}"
                   + (f" ({hint(old[key])})" if hint is not None and key in old else ""))
    return out


def _write_atomically(path: str | os.PathLike, write: Callable[[IO], Any], *, binary: bool = False) -> None:
    """Write the file ``path`` whole or not at all.

    ``write(f)`` fills ``f``, a new file ``path + ".tmp"`` in the same folder (text, UTF-8,
    newlines as written; or ``binary``), which then replaces ``path`` (``os.replace``: atomic
    on one file system). A killed process, a full disk or a read-only folder never leaves
    half a file at ``path``: a file there stays as it was until the new one is complete.

    Raises:
      OSError: writing or renaming failed (e.g. ``ENOSPC``, a full disk): the temporary
        file is removed, and the error (of the same errno, raised from the original) names
        ``path``. Any other exception of ``write`` removes it too.
    """
    path = _path(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename != path:
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise


def _write_json(path: str, obj: Any, indent: int = 2) -> None:
    """``obj`` as JSON (keys sorted) at ``path``, whole or not at all (:func:`_write_atomically`)."""
    _write_atomically(path, lambda f: json.dump(obj, f, indent=indent, sort_keys=True))


def _read_config(path: str) -> dict[str, Any]:
    """The stored configuration; ValueError naming ``path`` if it is not a JSON object."""
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path} cannot be read as JSON ({type(e).__name__}: {e}); restore it, or use another run directory"
        ) from e
    if not isinstance(stored, dict):
        raise ValueError(
            f"{path} holds a JSON {type(stored).__name__}, not the run's configuration (an object); "
            "restore it, or use another run directory"
        )
    return stored


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to ``{"a.b.c": leaf}`` so that a mismatch names the exact field."""
    if not isinstance(d, dict) or not d:
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."
