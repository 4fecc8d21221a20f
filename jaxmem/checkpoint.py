"""Run directories: orbax checkpoints of a training state plus the configuration behind it.

The one module that knows orbax. A run directory holds

* ``config.json`` — what the run is (plan fingerprint, data shapes, model structure,
  optimizer state structure, batch size, seed, user config), written when the run starts;
* ``checkpoints/<epoch>/`` — orbax ``CheckpointManager`` steps (``max_to_keep`` newest
  kept), each with the full training state (any pytree of arrays, PRNG keys included)
  and a JSON history of per-epoch metrics.

Opening a run directory with another configuration raises :class:`ConfigMismatchError`
naming every field that differs, so states from different plans, models or shapes are
never mixed; one whose ``config.json`` is missing (next to checkpoints) or unreadable is
refused too. A configuration with no checkpoint behind it (a run stopped before its
first) has no state to mix: another configuration replaces it. A checkpoint whose files
were damaged raises :class:`CheckpointDamagedError` instead of falling back to an older
one: nothing is skipped or overwritten silently.

Saves are asynchronous (orbax writes in a background thread into a temporary directory
and renames it when complete), so a process killed mid-save leaves the previous
checkpoint as the latest one.

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
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

__all__ = [
    "RunCheckpoints", "ConfigMismatchError", "CheckpointDamagedError", "fingerprint_array", "describe_tree",
    "latest_epoch", "run_lock", "RunDirectoryBusyError",
]

_FORMAT = 1

# Where orbax keeps the numbered checkpoints inside a run directory.
_STEPS_DIR = "checkpoints"

# The lock file of a run directory (removed when the run releases it).
_LOCK_FILE = ".jaxmem-lock"


def latest_epoch(run_dir: str | os.PathLike) -> int | None:
    """Epoch of the newest complete checkpoint in ``run_dir``, or None; opens nothing.

    For a look before a run (to report that it will resume, or refuse it) without
    :class:`RunCheckpoints`, which checks and writes the configuration.
    """
    return max(_epochs_on_disk(run_dir), default=None)


def incomplete_note(run_dir: str | os.PathLike, epoch: int) -> str:
    """``""``, or a note for a message about checkpoint ``epoch`` of ``run_dir`` whose
    folder lacks orbax's parts (an empty or partly copied folder, not a checkpoint)."""
    path = os.path.join(os.fspath(run_dir), _STEPS_DIR, str(epoch))
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
                        f"{': another thread of this process' if mine else ''}); wait for it to end, or use "
                        "another directory (two runs in one directory would overwrite each other's work)") from None
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
            # Removed before it is unlocked, so that nobody locks a file about to go.
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
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
    lock file is removed, and a directory that the lock created is removed again if it
    is still empty. Re-entrant within a thread: code that holds the directory may call
    what takes it again (``jaxmem run`` holds it around ``memorization`` and the report);
    another thread or process is refused. Where ``fcntl`` or ``flock`` is missing
    (Windows; some network file systems), nothing is locked.

    Args:
      directory: the run (or results) directory.
      what: how the error names it (e.g. ``"out_dir"``).

    Raises:
      RunDirectoryBusyError: another run (in another thread or process) holds ``directory``.
    """
    lock = _Lock(os.path.abspath(os.fspath(directory)), what)
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
      max_to_keep: newest checkpoints kept.
      mutable: config keys allowed to differ from the stored ones.

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
    ):
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        steps_dir = os.path.join(self.run_dir, _STEPS_DIR)
        for d in (self.run_dir, steps_dir):  # before orbax, which fails on them with thread noise
            if os.path.lexists(d) and not os.path.isdir(d):
                raise ValueError(f"run_dir: {d} exists and is not a directory; use another run directory")
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:  # a parent is a file
            raise ValueError(f"run_dir: cannot create directory {self.run_dir}: {e}") from e
        self._lock = _Lock(self.run_dir, "run_dir")  # held until close()
        try:
            self._open(config, max_to_keep, mutable)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, config: dict[str, Any], max_to_keep: int, mutable: tuple[str, ...]) -> None:
        config = json.loads(json.dumps({"format": _FORMAT, **config}))  # normalise tuples etc.
        self.config = config
        self._mutable = tuple(mutable)
        path = os.path.join(self.run_dir, "config.json")
        epochs = _epochs_on_disk(self.run_dir)
        if os.path.lexists(path):
            stored = _read_config(path)  # a damaged file is named, even with nothing behind it
            if epochs:
                self._check(stored, config, mutable)
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

    def _check(self, stored: dict, config: dict, mutable: tuple[str, ...], what: str = "") -> None:
        diffs = _differences(stored, config, mutable)
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
        """
        self._check(_read_config(os.path.join(self.run_dir, "config.json")), self.config, self._mutable,
                    what=f"run directory {self.run_dir} now holds another run's configuration (started there "
                         f"while this run had no checkpoint?); refusing to save checkpoint {int(epoch)} under it "
                         "(use a run directory per run)")
        self._manager.save(
            int(epoch),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saveable(state)),
                # A copy: orbax writes the JSON in the background, while the caller goes on
                # appending to its history (a checkpoint of epoch 1 held 2 epochs' rows).
                history=ocp.args.JsonSave(json.loads(json.dumps(history))),
                config=ocp.args.JsonSave(self.config),
            ),
        )

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
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves, release orbax's threads and the run directory."""
        try:
            self._manager.wait_until_finished()
            self._manager.close()
        finally:
            self._lock.release()


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


def _differences(stored: dict, config: dict, mutable: tuple[str, ...]) -> list[str]:
    """``"key: stored X vs now Y"`` for every flattened key that differs, ``mutable`` ones aside."""
    old, new = _flatten(stored), _flatten(config)
    return [
        f"{key}: stored {_short(old.get(key, '<missing>'))} vs now {_short(new.get(key, '<missing>'))}"
        for key in sorted(set(old) | set(new))
        if key.split(".")[0] not in mutable and old.get(key, "<missing>") != new.get(key, "<missing>")
    ]


def _write_json(path: str, obj: Any, indent: int = 2) -> None:
    """``obj`` as JSON (keys sorted) at ``path``, whole or not at all: written under a
    temporary name, then renamed (a killed process never leaves half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=True)
    os.replace(tmp, path)


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
