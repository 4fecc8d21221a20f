"""The end-to-end call: data -> plan -> ensemble -> log-likelihood matrix -> scores.

:func:`memorization` trains every member of a membership plan in one jitted program
(:mod:`jaxmem.ensemble`), evaluates the importance-weighted log-likelihood of every
example under every member (:mod:`jaxmem.likelihood`), and turns the matrix into
memorization scores (:mod:`jaxmem.scores`). The result saves to and loads from a
results directory::

    DIR/config.json      the full configuration (data, model, plan, training, scoring) of
                         the result beside it, written with it, and its provenance (the
                         software and device it was computed with; see memorization)
    DIR/scores.csv       one row per example: index, label, fold, U, V, M, stderr, n_in,
                         n_out, highly_memorized, logp_full, leverage, label_memorization
                         (an empty cell where a run has no such value; floats written
                         so that they read back exactly: 9 significant digits for
                         float32, the shortest exact form for float64)
    DIR/result.npz       every array (ll, keep, scores, history, scores over epochs), the
                         configuration and the sha256 of scores.csv; written last, so
                         that files a stopped save left from two results are refused
    DIR/run.json         the configuration of a run that has not saved its result yet
                         (stopped, or running); removed once it has
    DIR/tracked.npz      the scores over epochs as they are computed (kept on resume)
    DIR/checkpoints/     orbax checkpoints of the ensemble (resumable)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmem import _warn, ensemble as _ensemble, membership as _membership, models as _models
from jaxmem.checkpoint import (
    _LOCK_FILE,
    PROVENANCE_KEY,
    ConfigMismatchError,
    _path,
    _read_config,
    _write_atomically,
    _write_json,
    check_x64,
    incomplete_note,
    latest_epoch,
    provenance,
    run_lock,
)
from jaxmem.likelihood import loglik_matrix
from jaxmem.membership import _check_int
from jaxmem.mesh import as_mesh, make_mesh
from jaxmem.models import _latent
from jaxmem.scores import _check_quantile, feldman_zhang, memorization_scores

__all__ = ["MemorizationResult", "memorization", "load_result", "ConfigMismatchError"]

_FORMAT = 1
# New columns are appended, so that readers of older files (one column fewer) keep
# their column positions.
_CSV_COLUMNS = (
    "index", "label", "fold", "U", "V", "M", "stderr", "n_in", "n_out",
    "highly_memorized", "logp_full", "leverage", "label_memorization",
)


@dataclasses.dataclass
class MemorizationResult:
    """Memorization scores of every example, and everything they were computed from.

    Attributes (``n`` examples, ``m`` models of the plan; log terms in nats):
      U, V, M: f32 ``[n]``: log p under the models that trained on the example
        (densities averaged), under those that held it out, and ``M = U - V``.
      stderr: f32 ``[n]`` jackknife standard error of ``M`` over models.
      dof: f32 ``[n]`` Welch degrees of freedom of ``stderr``.
      n_in, n_out: int32 ``[n]`` numbers of models behind ``U`` and ``V``.
      highly_memorized: bool ``[n]``: ``M`` above its ``quantile`` quantile.
      threshold: that quantile of ``M`` (nats).
      ll: f32 ``[m, n]`` log-likelihood matrix.
      keep: bool ``[m, n]`` membership plan.
      fold: int32 ``[n]`` fold that held the example out in the first repeat
        (-1 for non-k-fold plans).
      labels: int32 ``[n]`` or None.
      logp_full: f32 ``[n]`` log p under a model trained on all examples, or None.
      leverage: f32 ``[n]`` hat-matrix leverage of the design ``[1, x]`` (the linear
        baseline), or None when ``n`` is not larger than the number of features plus one
        (the intercept column).
      label_memorization: f32 ``[n]`` Feldman & Zhang's estimator (classifiers), or None.
      tracked_epochs: int32 ``[E]`` epochs at which ``M`` was also computed.
      M_by_epoch: f32 ``[E, n]``.
      history: per-member training curves, ``{"train_loss", "heldout_loss"}`` f32
        ``[epochs, m]`` (nats per example).
      config: the JSON configuration of the run.
    """

    U: np.ndarray
    V: np.ndarray
    M: np.ndarray
    stderr: np.ndarray
    dof: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray
    highly_memorized: np.ndarray
    threshold: float
    ll: np.ndarray
    keep: np.ndarray
    fold: np.ndarray
    labels: np.ndarray | None
    logp_full: np.ndarray | None
    leverage: np.ndarray | None
    label_memorization: np.ndarray | None
    tracked_epochs: np.ndarray
    M_by_epoch: np.ndarray
    history: dict[str, np.ndarray]
    config: dict[str, Any]

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``config.json``, ``scores.csv`` and ``result.npz`` into ``directory``.

        Each file is written whole under a temporary name, then renamed; ``result.npz``
        last, holding the configuration and the sha256 of ``scores.csv``, so that the files
        of a save stopped half way (new ``config.json`` and ``scores.csv`` beside the old
        ``result.npz``) are refused by :func:`load_result` rather than read as one result.
        ``directory`` is held while writing (:func:`jaxmem.run_lock`), so a save never
        interleaves with a run or a report writing the same directory.

        Raises:
          RunDirectoryBusyError: another thread or process (a run, ``jaxmem report``)
            holds ``directory``.
          OSError: a file cannot be written (e.g. ``ENOSPC``, a full disk): the error
            names it, and no temporary file is left behind.
        """
        path = _path(directory)
        with run_lock(path, "results directory"):  # re-entrant for memorization's own save
            self._save(path)
        return str(directory)

    def _save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        arrays = {
            k: v for k, v in dataclasses.asdict(self).items()
            if k not in ("config", "history") and v is not None
        }
        arrays["threshold"] = np.asarray(self.threshold)
        for k, v in self.history.items():
            arrays[f"history_{k}"] = v
        _write_json(os.path.join(directory, "config.json"), self.config)
        arrays["config_json"] = np.asarray(_canonical_json(self.config))
        arrays["scores_csv_sha256"] = np.asarray(self._write_csv(os.path.join(directory, "scores.csv")))
        _atomic_npz(os.path.join(directory, "result.npz"), arrays)

    def _write_csv(self, path: str) -> str:
        """Write ``scores.csv``; returns the sha256 (hex) of the file written."""
        n = len(self.M)
        cols = {
            "index": np.arange(n), "label": self.labels, "fold": self.fold,
            "U": self.U, "V": self.V, "M": self.M, "stderr": self.stderr,
            "n_in": self.n_in, "n_out": self.n_out,
            "highly_memorized": self.highly_memorized.astype(int),
            "logp_full": self.logp_full, "leverage": self.leverage,
            "label_memorization": self.label_memorization,
        }

        def write(f) -> None:
            w = csv.writer(f)
            w.writerow(_CSV_COLUMNS)
            for i in range(n):
                w.writerow(["" if cols[c] is None else _fmt(cols[c][i]) for c in _CSV_COLUMNS])

        _write_atomically(path, write)
        return _sha256_file(path)  # (the directory is held: nobody has replaced it since)


def _fmt(v: Any) -> str:
    """A CSV cell that reads back as the same value: log p of -3e4 nats (image
    densities) needs all of float32's digits for U - V to equal M."""
    if isinstance(v, np.floating) and np.finfo(v.dtype).bits <= 32:
        return f"{float(v):.9g}"  # 9 significant digits round-trip any float32
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # the shortest string that round-trips the float64
    return str(int(v)) if isinstance(v, (bool, np.bool_, np.integer)) else str(v)


def _atomic_npz(path: str, arrays: dict[str, Any]) -> None:
    """``arrays`` as an ``.npz`` at exactly ``path``, whole or not at all (:func:`_write_atomically`)."""
    _write_atomically(path, lambda f: np.savez(f, **arrays), binary=True)  # a file: numpy appends no .npz


def _canonical_json(obj: Any) -> str:
    """One string per JSON value (keys sorted), to compare configurations as written."""
    return json.dumps(obj, sort_keys=True)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_result(directory: str | os.PathLike) -> MemorizationResult:
    """Read a :class:`MemorizationResult` written by :meth:`MemorizationResult.save`.

    Raises:
      FileNotFoundError: ``directory`` holds no ``result.npz``.
      ValueError: the result is incomplete, damaged or mixed (no ``config.json``, an
        array missing or of another number of examples, a file that does not parse; a
        ``config.json`` or ``scores.csv`` that is not the one saved with ``result.npz``,
        or a configuration of more or fewer training epochs than the result's history).
    """
    directory = _path(directory)  # as memorization(out_dir="~/...") wrote it
    path = os.path.join(directory, "result.npz")
    if not os.path.exists(path):
        stopped = _latest_checkpoint(directory)
        if stopped is not None or os.path.exists(os.path.join(directory, _RUN_CONFIG)):
            after = f"after epoch {stopped}" if stopped is not None else "before its first checkpoint"
            raise FileNotFoundError(
                f"{directory} holds a run stopped {after}, with no result yet: run the same `jaxmem run` "
                "command (or memorization() call) again to resume it"
            )
        raise FileNotFoundError(f"{directory} holds no jaxmem result (no result.npz); run `jaxmem run` first")
    from jaxmem.data import _np_load

    with _np_load(pathlib.Path(path)) as z:
        arrays = {k: z[k] for k in z.files}
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{directory} holds result.npz but no config.json: the result is incomplete")
    config = _read_config(config_path)
    # Results saved since they carry their configuration and the digest of their CSV: a
    # save stopped between its files leaves ones that do not match.
    mixed = []
    if "config_json" in arrays and _canonical_json(config) != str(arrays["config_json"]):
        mixed.append("config.json")
    csv_path = os.path.join(directory, "scores.csv")
    if "scores_csv_sha256" in arrays and os.path.exists(csv_path) and \
            _sha256_file(csv_path) != str(arrays["scores_csv_sha256"]):
        mixed.append("scores.csv")
    if mixed:
        raise ValueError(f"{directory}: {' and '.join(mixed)} {'does' if len(mixed) == 1 else 'do'} not belong "
                         "to its result.npz (a save stopped half way, or files of another result); save the "
                         "result again (`jaxmem run` with the same options scores it again from its checkpoints)")
    history = {k[len("history_"):]: arrays.pop(k) for k in list(arrays) if k.startswith("history_")}
    training = config.get("training")
    epochs = training.get("epochs") if isinstance(training, dict) else None
    rows = history["train_loss"].shape[0] if "train_loss" in history else None
    if isinstance(epochs, int) and rows is not None and rows != epochs:
        # Written by older jaxmem versions, which stated a rerun's configuration when its
        # training began: the result beside it is then one of fewer epochs.
        raise ValueError(f"{config_path} describes a run of {epochs} epochs but result.npz holds the result "
                         f"of {rows} (its training history): a rerun with more epochs stopped before saving "
                         "its result; run it again with the same options to finish it")
    missing = [k for k in _REQUIRED_ARRAYS if k not in arrays]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not a complete jaxmem result")
    n = arrays["keep"].shape[-1] if arrays["keep"].ndim == 2 else -1
    wrong = [f"{k} {arrays[k].shape}" for k in _PER_EXAMPLE if k in arrays and arrays[k].shape[-1:] != (n,)]
    if n < 0 or wrong:
        raise ValueError(f"{path} is damaged: keep {arrays['keep'].shape} should be [models, examples] and "
                         f"every per-example array [..., {n}]; got {', '.join(wrong) or 'no examples axis'}")
    fields = {f.name for f in dataclasses.fields(MemorizationResult)}
    kwargs = {k: arrays.get(k) for k in fields if k not in ("config", "history")}
    kwargs["threshold"] = float(arrays["threshold"])
    return MemorizationResult(**kwargs, history=history, config=config)


# What every saved result holds (the others are optional: labels, logp_full, leverage,
# label_memorization), and the arrays whose last axis is the examples.
_REQUIRED_ARRAYS = ("U", "V", "M", "stderr", "dof", "n_in", "n_out", "highly_memorized", "threshold",
                    "ll", "keep", "fold", "tracked_epochs", "M_by_epoch")
_PER_EXAMPLE = ("U", "V", "M", "stderr", "dof", "n_in", "n_out", "highly_memorized", "ll", "fold", "labels",
                "logp_full", "leverage", "label_memorization", "M_by_epoch")


# May differ on resume: more epochs continue training; the epochs scored along the way
# do not touch the training state (scores of epochs already passed are not recomputed).
_MUTABLE = ("training.epochs", "scoring.track_epochs", "format")

# Keys added to the configuration after runs were written without them, with the value
# those runs had: an older directory reads as that value and still resumes. Other keys
# added later (training.devices: how many an older run trained on is not known) are
# refused, named, in a directory written without them.
_ADDED_LATER = {"scoring.matmul_dtype": "float32", "scoring.preprocess_draws": 1}

# The configuration of a run that has not saved its result yet; config.json is the result's.
_RUN_CONFIG = "run.json"


def _check_out_dir(directory: str) -> None:
    """Refuse an ``out_dir`` that is a file, or a folder of other files than a jaxmem run's
    (its results would overwrite them: scores.csv, summary.md, the figures)."""
    if not directory:
        raise ValueError("out_dir is an empty path (an unset variable?); give a folder (new or of a jaxmem run)")
    if os.path.islink(directory) and not os.path.exists(directory):
        raise ValueError(f"out_dir {directory} is a symbolic link to {os.readlink(directory)}, which does not "
                         "exist; create that folder first, or give another out_dir")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"out_dir {directory} is a file; give a folder (new or of a jaxmem run)")
    if os.path.isdir(directory) and os.listdir(directory) and not any(
            os.path.exists(os.path.join(directory, name))
            for name in ("config.json", _RUN_CONFIG, "checkpoints", "result.npz", _LOCK_FILE)):
        entries = sorted(os.listdir(directory))
        raise ValueError(f"out_dir {directory} holds files that are not a jaxmem run ({', '.join(entries[:5])}"
                         f"{', ...' if len(entries) > 5 else ''}); results would overwrite them: give a new or "
                         "empty folder")


def _check_config(directory: str, config: dict[str, Any], trained: int | None) -> bool:
    """Refuse to reuse ``directory`` for another configuration (training epochs may grow).

    Checks the configurations of the run in progress (``run.json``) and of the result
    (``config.json``). One with nothing behind it (no checkpoint, no result: a run that
    failed or was stopped before its first checkpoint) is not checked: the new run
    replaces it, with its tracked scores, once training has accepted the directory.
    Writes nothing.

    Args:
      trained: the epoch of the directory's newest checkpoint, or None.

    Returns:
      Whether the directory's configuration (if any) has nothing behind it.
    """
    paths = [os.path.join(directory, name) for name in (_RUN_CONFIG, "config.json")]
    stored = [_read_config(path) for path in paths if os.path.exists(path)]  # a damaged file is named
    if trained is None and not os.path.exists(os.path.join(directory, "result.npz")):
        return True
    flat_b = _flatten(config)
    for before in stored:
        flat_a = {**_ADDED_LATER, **_flatten(before)}
        differ = sorted(
            k for k in set(flat_a) | set(flat_b)
            if flat_a.get(k) != flat_b.get(k) and k not in _MUTABLE and not k.startswith(PROVENANCE_KEY + ".")
        )
        if differ:
            detail = "; ".join(_difference(k, flat_a, flat_b) for k in differ[:6])
            unknown = [k for k in differ if k not in flat_a]
            advice = (f"It was written before jaxmem recorded {', '.join(unknown)}, so it cannot be checked "
                      "against this run: use another output directory." if unknown else
                      "Use another output directory, or the same options to resume it.")
            raise ConfigMismatchError(f"{directory} holds a run with another configuration ({detail}). {advice}")
    return False


def _difference(key: str, stored: dict[str, Any], asked: dict[str, Any]) -> str:
    """One differing key of :func:`_check_config`'s message, with how to match it."""
    if key not in stored:
        return f"{key}: not recorded, asked {asked.get(key)!r}"
    text = f"{key}: stored {stored[key]!r}, asked {asked.get(key)!r}"
    if key == "training.devices":
        count = stored[key]
        text += f" ({_ensemble._devices_hint(count, also=f', or --devices {count} to `jaxmem run`')})"
    return text


def _run_provenance(directory: str, now: dict[str, Any]) -> dict[str, Any]:
    """The provenance of a run resumed in ``directory``: ``now`` (this session's
    :func:`~jaxmem.checkpoint.provenance`), with ``"earlier"``: the records of the earlier
    sessions that ran other software or devices, oldest first (from the record of the
    directory's latest session, ``run.json``'s or else ``config.json``'s; a session of a
    jaxmem that recorded none leaves no entry)."""
    before = None
    for name in (_RUN_CONFIG, "config.json"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            before = _read_config(path).get(PROVENANCE_KEY)
            break
    if not isinstance(before, dict):
        return now
    earlier = list(before.get("earlier", []))
    last = {k: v for k, v in before.items() if k != "earlier"}
    # a key the earlier record lacks (cpu_cores, from an older jaxmem) tells nothing
    if any(last.get(k) != v for k, v in now.items() if k in last):
        earlier.append(last)
    return {**now, "earlier": earlier} if earlier else now


def _check_labels(y: Any, n: int) -> np.ndarray:
    """``y`` as a numpy array of ``n`` whole-number labels (int32 range); else a ValueError."""
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},) to match x, got {y.shape}")
    y = _models.whole_number_labels(y, "y must hold")
    info = np.iinfo(np.int32)
    wide = y.astype(np.float64) if np.issubdtype(y.dtype, np.floating) else y  # float32(2**31-1) is 2**31
    if n and (wide.min() < info.min or wide.max() > info.max):
        i = int(np.argmax((wide < info.min) | (wide > info.max)))
        raise ValueError(f"label {y[i]} of example {i} does not fit in int32, the labels' stored type")
    return y


def _holds_saved_result(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds the saved result of its run (``result.npz``, and no
    ``run.json`` of a run in progress or stopped since)."""
    return os.path.exists(os.path.join(out_dir, "result.npz")) and not os.path.exists(
        os.path.join(out_dir, _RUN_CONFIG))


def _latest_checkpoint(out_dir: str | os.PathLike) -> int | None:
    """Epoch of the newest complete training checkpoint in a results directory, or None."""
    return latest_epoch(_run_dir(out_dir))


def _run_dir(out_dir: str | os.PathLike) -> str:
    """The training run directory (checkpoints) inside a results directory."""
    return os.path.join(os.path.abspath(out_dir), "checkpoints")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _model_data(model_cfg: dict[str, Any], x: np.ndarray, y: np.ndarray | None) -> Any:
    if model_cfg["name"] == "classifier":  # y checked by models.check_data
        return (jnp.asarray(x), jnp.asarray(y, jnp.int32))
    return jnp.asarray(x)


def _random_preprocessing(model_cfg: dict[str, Any]) -> bool:
    """Whether the model's preprocessing draws noise (the seeded draw scoring shares)."""
    return ((model_cfg["name"] == "mlp_vae" and model_cfg.get("binarize") == "dynamic")
            or (model_cfg["name"] == "conv_vae" and model_cfg.get("dequantize") == "uniform"))


def _leverage_baseline(x: np.ndarray) -> np.ndarray | None:
    """Leverage of ``[1, x]`` (flattened features), or None when there are too few examples."""
    from jaxmem.linear import leverage

    flat = x.reshape(len(x), -1).astype(np.float32)
    design = np.concatenate([np.ones((len(x), 1), np.float32), flat], axis=1)
    if design.shape[0] <= design.shape[1]:
        return None
    return np.asarray(leverage(design))


def _score_keys(seed: int, num_trained: int, draws: int) -> tuple[jax.Array, list[jax.Array]]:
    """The scoring key of a run and the base key of each preprocessing draw.

    Member ``m`` trains from ``fold_in(seed_key(seed), m)`` (:mod:`jaxmem.ensemble`), so
    scoring takes a stream no member has: ``fold_in(root, 0x5C0)`` when fewer than 1473
    models are trained (the key of every run so far), else ``fold_in(root, 2**32 - 1)``
    (member 1472's key is ``fold_in(root, 0x5C0)``). Draw 0 is scored with it; draw
    ``d >= 1`` with ``fold_in(fold_in(root, 2**32 - 2), d)``, apart from the examples'
    keys ``fold_in(score_key, i)`` (``fold_in(score_key, d)`` was example d's key).
    """
    root = _ensemble.seed_key(seed)
    score_key = jax.random.fold_in(root, 0x5C0 if num_trained <= 0x5C0 else 2**32 - 1)
    others = jax.random.fold_in(root, 2**32 - 2)
    return score_key, [score_key] + [jax.random.fold_in(others, d) for d in range(1, draws)]


def _warn_if_stderr_undefined(plan: _membership.Plan) -> None:
    """Warn, before training, when the plan leaves examples with one model on a side:
    their ``stderr`` and ``dof`` (an uncertainty over models) will be NaN."""
    one_out = int(np.sum(plan.out_counts() < 2))
    one_in = int(np.sum(plan.in_counts() < 2))
    if one_out or one_in:
        sides = " and ".join(f"{k} of {plan.n} examples by a single {side} model" for k, side in
                             ((one_out, "held-out"), (one_in, "training")) if k)
        _warn.warn(
            f"the plan scores {sides}: their stderr and dof will be NaN (an uncertainty over "
            "models needs two on each side). repeats >= 2 gives every example two held-out models "
            "(the paper ran 10 folds x 10 repeats)",
            UserWarning,
        )


def memorization(
    x: Any,
    y: Any = None,
    *,
    model: str = "mlp_vae",
    model_options: dict[str, Any] | None = None,
    plan: _membership.Plan | None = None,
    folds: int = 10,
    repeats: int = 1,
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    optimizer: optax.GradientTransformation | None = None,
    num_samples: int = 256,
    preprocess_draws: int = 1,
    matmul_dtype: str | None = None,
    seed: int = 0,
    quantile: float = 0.95,
    full_model: bool = False,
    track_epochs: Sequence[int] = (),
    track_samples: int | None = None,
    out_dir: str | os.PathLike | None = None,
    data_info: dict[str, Any] | None = None,
    progress: bool = True,
    mesh: Any = None,
    checkpoint_every: int = 1,
    linear_baseline: bool = True,
    on_stage: Any = None,
    on_epoch: Any = None,
) -> MemorizationResult:
    """Memorization scores of every example of ``x``, end to end.

    Trains one model per member of a membership plan (K-fold with ``folds`` x
    ``repeats`` by default, the paper's design, which ran 10 x 10) in one jitted program, then evaluates
    ``ll[m, i]``, the importance-weighted log-likelihood (``num_samples`` samples) of
    example ``i`` under member ``m``, and scores it (:func:`jaxmem.scores.memorization_scores`).
    Each call compiles its training program anew (as :func:`jaxmem.ensemble.fit` does),
    seconds for small models, even when an identical call ran before in the process.

    Args:
      x: f32 ``[n, *example_shape]`` examples (images in [0, 1]).
      y: int ``[n]`` labels (needed by ``model="classifier"``; kept in the results).
      model: a name of :data:`jaxmem.models.MODELS`.
      model_options: keyword options of the model (e.g. ``{"hidden": [512, 256]}``).
      plan: a membership plan; default ``kfold(n, folds, repeats, seed)``.
      folds, repeats: the default plan's K and R. With ``repeats=1`` every example has one
        held-out model, so its ``stderr`` and ``dof`` are NaN (warned before training);
        ``repeats >= 2`` gives every example an uncertainty.
      epochs: training epochs of every member.
      batch_size: examples per member per optimizer step.
      learning_rate: Adam's step size.
      optimizer: an optax transformation to use instead of ``adam(learning_rate)``
        (e.g. with a schedule). It cannot be recorded in the configuration, so a
        resumed run must be given the same one.
      num_samples: importance samples per likelihood (the paper: 256 on MNIST).
      preprocess_draws: draws of the model's random preprocessing over which each
        ``ll[m, i]`` is averaged (a mean of log-likelihoods, each draw with its own
        ``num_samples`` importance samples; the first draw is the one a single draw
        takes). With ``mlp_vae``'s dynamic binarization every example is scored as one
        random binarization of it, shared by all members, so ``M`` is that binarization's
        score: its spread over draws is not in ``stderr`` (the jackknife is over models)
        and shrinks as ``1/sqrt(preprocess_draws)``; the same holds, less, for
        ``conv_vae``'s dequantization noise. Refused (``> 1``) for a model whose
        preprocessing draws nothing (raise ``num_samples`` there). Costs
        ``preprocess_draws`` times the scoring time.
      matmul_dtype: ``None``/``"float32"`` (default) or ``"bfloat16"``: the matmul
        inputs of every likelihood evaluation (training is float32 either way); see
        :func:`jaxmem.likelihood.loglik_matrix`, which states what bf16 changes.
      seed: everything random (plan, initialisation, batches, samples) derives from it; an
        integer in [0, 2**32) (JAX keys take 32 bits). The samples are drawn from a stream
        no member trains from.
      quantile: "highly memorized" means ``M`` above this quantile.
      full_model: also train a model on all examples (as one more member of the same
        program) and report ``logp_full``. It takes the same number of steps per epoch
        as the plan's models, ``steps = ceil(max_m |train_m| / batch_size)`` over the
        plan's members ``m``, so that these train (and score) exactly as without it; each
        epoch it therefore trains on a fresh random subset of ``min(n, steps *
        batch_size)`` distinct examples of its ``n``, a fraction of about
        ``max_m |train_m| / n`` ((K-1)/K for K-fold plans).
      track_epochs: epochs after which ``M`` is also computed (stored in
        ``M_by_epoch``), without retraining. A rerun in ``out_dir`` keeps the epochs
        scored before, and scores the epoch of the newest checkpoint (the state it
        restores) if an earlier run stopped before scoring it; an earlier epoch that an
        earlier run trained without scoring it cannot be scored (only the newest
        checkpoint is restored, and epochs before it are not trained again): it is left
        out with a ``UserWarning`` naming it.
        ``tracked_epochs`` and the configuration's ``scoring.track_epochs`` list the
        epochs scored.
      track_samples: importance samples for the tracked scores (default ``num_samples``).
      out_dir: results directory; training checkpoints go to ``out_dir/checkpoints``
        and a rerun on the same directory resumes. Another configuration there raises
        :class:`ConfigMismatchError` (one with nothing behind it, no checkpoint and no
        result, is replaced). The run's configuration goes to ``out_dir/run.json`` once
        training has accepted the directory, and to ``config.json`` with the result, so
        that a result on disk keeps the configuration it was computed with while a rerun
        (e.g. with more epochs) is under way or stopped.
      data_info: JSON facts about the data recorded in the configuration.
      progress: show progress bars.
      mesh: mesh for the member axis of training and the example axis of scoring
        (default: :func:`jaxmem.ensemble.default_mesh` for training, every device for
        scoring; on a CPU, call :func:`jaxmem.mesh.use_cpu_devices` first to have one
        device per core, as ``jaxmem run`` does). The number of devices training runs on
        changes its float rounding, so it is recorded (``training.devices``) and a
        resumed run must train on as many; scores do not depend on the scoring mesh.
        The software changes training's rounding too: the configuration records the
        run's ``provenance`` (:func:`jaxmem.checkpoint.provenance`: python, jax, jaxlib,
        flax and optax versions, platform and device kind), never compared on resume;
        a run resumed under other jax, jaxlib, flax or optax versions than its
        checkpoint was saved under warns (``UserWarning``: its numbers match neither
        version's uninterrupted run, to float rounding), and its ``provenance`` is this
        session's record with ``"earlier"``, the records of the earlier sessions that
        ran other software, oldest first.
      checkpoint_every: epochs between checkpoints.
      linear_baseline: compute hat-matrix leverage of the data for comparison.
      on_stage: optional ``callback(stage: str)`` called as stages begin (for CLIs).
      on_epoch: optional ``callback(epoch: int)`` called after each epoch trained, once
        its checkpoint save has started (and its scores, if tracked, are stored; those of
        the last epoch come with the final scores): the
        safe place for a CLI to stop on Ctrl-C (raise ``KeyboardInterrupt`` there).

    Returns:
      A :class:`MemorizationResult` (saved to ``out_dir`` when given).

    Raises:
      ValueError: before anything is trained or written, for data the model has no
        likelihood for (non-finite values; ``mlp_vae`` intensities outside [0, 1];
        ``conv_vae`` pixels outside [0, 1]; classifier labels missing, fractional or
        outside ``[0, num_classes)``: :func:`jaxmem.models.check_data`), shapes that do
        not match, no examples, labels that are not whole numbers, an option out of
        its range or of the wrong type (counts that are not integers, ``epochs < 1``,
        a learning rate that is not positive and finite, ``quantile`` outside [0, 1],
        a negative seed, a ``plan`` that is not a :class:`~jaxmem.membership.Plan`), a call
        in a multi-process run (``jax.distributed``; use ``fit`` and
        :func:`~jaxmem.likelihood.loglik_matrix_multihost` there), a
        plan that leaves an example never held out or never trained on, or an
        ``out_dir`` whose files are damaged.
      ConfigMismatchError: ``out_dir`` holds a run of another configuration, e.g.
        trained on another number of devices (``mesh``) or under another
        ``jax_enable_x64`` setting, or one written before ``training.devices`` was
        recorded (the directory is left as it was).
    """
    if jax.process_count() > 1:  # before anything is trained: its scoring is one process's
        raise ValueError(
            f"memorization() runs within one process, and this is process {jax.process_index()} of "
            f"{jax.process_count()} (jax.distributed): train with jaxmem.ensemble.fit on a process's own devices, "
            "score across processes with jaxmem.loglik_matrix_multihost, then memorization_scores")
    x = np.asarray(x, np.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be [examples, *example_shape], got shape {x.shape}")
    n = x.shape[0]
    if n == 0:
        raise ValueError(f"x has no examples (shape {x.shape})")
    bad = np.argwhere(~np.isfinite(x.reshape(n, -1)))
    if bad.size:
        raise ValueError(f"x has {len(bad)} non-finite value(s); the first is in example {int(bad[0][0])}")
    if y is not None:
        y = _check_labels(y, n)
    # Every option is checked here, before anything is trained or written: an option
    # found bad only when the scores are computed would cost the whole training.
    seed = _ensemble._check_key_seed(seed)
    if isinstance(epochs, (bool, np.bool_)) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r} (untrained models memorize nothing)")
    epochs = int(epochs)
    batch_size = _check_int("batch_size", batch_size, 1)
    num_samples = _check_int("num_samples", num_samples, 1)
    track_samples = num_samples if track_samples is None else _check_int("track_samples", track_samples, 1)
    preprocess_draws = _check_int("preprocess_draws", preprocess_draws, 1)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
    learning_rate = _ensemble.check_learning_rate(learning_rate)
    quantile = _check_quantile(quantile)
    if mesh is not None:
        mesh = as_mesh(mesh)  # before training: a mesh the kernels cannot use fails here, not after it
    if plan is None:
        plan = _membership.kfold(n, folds, repeats=repeats, seed=seed)
    if not isinstance(plan, _membership.Plan):
        raise ValueError(f"plan must be a jaxmem Plan (kfold, random_subsets, balanced_subsets, load_plan; "
                         f"Plan.from_keep(keep) for a bool [models, examples] array), got {type(plan).__name__}")
    if plan.n != n:
        raise ValueError(f"the plan covers {plan.n} examples but x has {n}")
    plan.validate()
    model_cfg = _models.model_config(model, x.shape[1:], **(model_options or {}))
    if preprocess_draws > 1 and not _random_preprocessing(model_cfg):
        options = {k: v for k, v in model_cfg.items() if k in ("binarize", "dequantize")}
        raise ValueError(
            f"preprocess_draws={preprocess_draws} averages over draws of a model's random preprocessing "
            f"(mlp_vae's dynamic binarization, conv_vae's uniform dequantization), and {model_cfg['name']}"
            f"{' with ' + str(options) if options else ''} draws none: leave preprocess_draws at 1 "
            "(num_samples sets the importance samples)")
    y = _models.check_data(model_cfg, x, y)  # value ranges: before anything is trained
    tracked = sorted({_check_int("track_epochs entries", e, 1) for e in track_epochs})
    outside = [e for e in tracked if e > epochs]
    if outside:
        raise ValueError(f"track_epochs {outside} lie outside the epochs 1..{epochs} that are trained")
    matmul_dtype = _latent.check_matmul_dtype(matmul_dtype)
    keep = np.asarray(plan.keep)
    train_keep = np.concatenate([keep, np.ones((1, n), bool)]) if full_model else keep
    num_plan = keep.shape[0]
    # Training's float rounding depends on how many devices the members are split over
    # (scoring's does not: every example draws its samples from its own key), so the
    # count is part of the configuration, and a run resumes only on as many.
    train_mesh = mesh if mesh is not None else _ensemble.default_mesh(train_keep.shape[0])
    config = {
        "format": _FORMAT,
        "data": {"n": int(n), "example_shape": list(x.shape[1:]), **(data_info or {})},
        "model": model_cfg,
        "plan": {"kind": plan.kind, "num_models": int(plan.num_models), "k": plan.k,
                 "repeats": plan.repeats, "rate": plan.rate, "seed": plan.seed},
        "training": {"epochs": int(epochs), "batch_size": int(batch_size),
                     "learning_rate": float(learning_rate),
                     "optimizer": "adam" if optimizer is None else "custom",
                     "full_model": bool(full_model), "seed": int(seed),
                     "devices": int(train_mesh.size)},
        "scoring": {"num_samples": int(num_samples), "preprocess_draws": preprocess_draws,
                    "quantile": float(quantile),
                    "track_epochs": tracked, "track_samples": track_samples,
                    "matmul_dtype": matmul_dtype},
        # Recorded, never compared: a resume under other versions warns (jaxmem.checkpoint).
        PROVENANCE_KEY: provenance(),
    }
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        out_dir = _path(out_dir) if out_dir else out_dir
        _check_out_dir(out_dir)
    # The directory is held from its first look to the result (run_lock): a second run
    # started in it meanwhile is refused, not mixed with this one.
    with run_lock(out_dir, "out_dir") if out_dir is not None else contextlib.nullcontext():
        run_dir = None
        trained = None
        replaces = False  # the directory's configuration has nothing behind it
        if out_dir is not None:
            trained = _latest_checkpoint(out_dir)
            replaces = _check_config(out_dir, config, trained)
            # Before on_stage("train"), where `jaxmem run` says that it resumes.
            check_x64(_run_dir(out_dir))
            if not replaces:
                config[PROVENANCE_KEY] = _run_provenance(out_dir, config[PROVENANCE_KEY])
            if trained is not None and trained > epochs:
                # Resuming would restore that checkpoint and score it as `epochs` epochs.
                raise ConfigMismatchError(
                    f"{out_dir} holds a run trained for {trained} epochs, more than the {epochs} "
                    f"asked for; ask for at least {trained} epochs, or use another output directory"
                    + incomplete_note(_run_dir(out_dir), trained)
                )
            run_dir = _run_dir(out_dir)
        run_stated = out_dir is None

        def state_run():
            """Write this run's configuration (run.json), once training has accepted the
            directory (its checkpoints check the data and the training options): a refused
            rerun leaves the directory as it was. config.json stays the result's until the
            result is saved."""
            nonlocal run_stated
            if run_stated:
                return
            os.makedirs(out_dir, exist_ok=True)
            if replaces:  # a stopped run's configuration and scores, with no checkpoint behind them
                for stale in ("config.json", "tracked.npz"):
                    if os.path.exists(os.path.join(out_dir, stale)):
                        os.remove(os.path.join(out_dir, stale))
            _write_json(os.path.join(out_dir, _RUN_CONFIG), config)
            run_stated = True

        # The plan's default number of steps: the full model (n examples) must not add steps
        # to the plan's members, whose scores would then depend on whether it is trained.
        plan_steps = -(-int(keep.sum(axis=1).max()) // batch_size)
        data = _model_data(model_cfg, x, y)
        score_mesh = mesh if mesh is not None else make_mesh()
        score_key, draw_keys = _score_keys(seed, train_keep.shape[0], preprocess_draws)

        def plan_members(state):
            return jax.tree.map(lambda a: a[:num_plan], state)

        # Scores over epochs: computed in the training callback, persisted as they come so a
        # resumed run keeps the epochs scored before it was interrupted. Those of the last
        # epoch, at the final sample count, are the final scores: computed once, at the end.
        track_path = os.path.join(out_dir, "tracked.npz") if out_dir else None
        last_is_final = track_samples == num_samples
        M_by_epoch: dict[int, np.ndarray] = {}
        if track_path and not replaces and os.path.exists(track_path):
            try:
                with np.load(track_path) as z:
                    M_by_epoch = {int(e): z["M"][j] for j, e in enumerate(z["epochs"])}
            except Exception as err:  # noqa: BLE001 - numpy raises several kinds for a damaged file
                raise ValueError(f"{track_path} is damaged ({type(err).__name__}: {err}); delete it to "
                                 "recompute the tracked epochs' scores, or use another output directory") from None
            if any(np.shape(v) != (n,) for v in M_by_epoch.values()):
                raise ValueError(f"{track_path} holds scores of another number of examples than {n}")
        # Epochs restored from the checkpoints are not trained again, so a tracked epoch before
        # the newest checkpoint can be scored only if an earlier run did (its states are not
        # kept). Said, and left out of the configuration, which lists the epochs scored. The
        # newest checkpoint's epoch is the state restored: scored from it if an earlier run
        # stopped before scoring it.
        unscored = [e for e in tracked if trained is not None and e < trained and e not in M_by_epoch]
        tracked = [e for e in tracked if e not in unscored]
        rescore = trained is not None and trained < epochs and trained in tracked and trained not in M_by_epoch
        config["scoring"]["track_epochs"] = sorted(set(tracked) | set(M_by_epoch))

        def loglik(members, samples, progress=False):
            """``ll [members, n]``, averaged over ``preprocess_draws`` draws of the preprocessing."""
            total = 0.0  # float64, then float32: one draw's values come back exactly
            for d in range(preprocess_draws):
                total = total + np.asarray(loglik_matrix(
                    graphdef, members, data, key=draw_keys[d],
                    num_samples=samples, mesh=score_mesh, progress=progress, matmul_dtype=matmul_dtype), np.float64)
            return (total / preprocess_draws).astype(np.float32)

        def record(epoch, M):
            M_by_epoch[epoch] = np.asarray(M)
            if track_path:
                es = sorted(M_by_epoch)
                _atomic_npz(track_path, {"epochs": np.asarray(es), "M": np.stack([M_by_epoch[e] for e in es])})

        def score_epoch(epoch, members):
            ll_e = loglik(members, track_samples)
            record(epoch, memorization_scores(ll_e, keep, quantile=quantile, mesh=score_mesh).M)

        def callback(epoch, state, metrics):
            state_run()
            if epoch in tracked and not (epoch == epochs and last_is_final):
                score_epoch(epoch, plan_members(_ensemble._merged_state(state)))
            if on_epoch is not None:
                on_epoch(epoch)

        factory = lambda s: _models.from_config(model_cfg, seed=s)  # noqa: E731
        graphdef = _ensemble._graphdef_of(factory)
        tx = optimizer or optax.adam(learning_rate)

        def train(upto, **kw):
            try:
                return _ensemble.fit(
                    factory, tx, data, train_keep, epochs=upto, batch_size=batch_size, seed=seed, run_dir=run_dir,
                    checkpoint_every=checkpoint_every, mesh=train_mesh,
                    steps_per_epoch=plan_steps if full_model else None,
                    config={"model": model_cfg, "learning_rate": float(learning_rate)}, **kw,
                )
            except _ensemble.TrainingDivergedError as err:
                if out_dir is None:
                    raise
                # fit's "lower the learning rate" and its kept checkpoint: out_dir resumes
                # only under its own configuration, learning rate and optimizer included.
                setting = "the optimizer it was given" if optimizer is not None else f"learning rate {learning_rate:g}"
                raise _ensemble.TrainingDivergedError(
                    f"{err}. The learning rate is part of the run's configuration: {out_dir} resumes only with "
                    f"{setting}, so a lower one trains from scratch in a new output directory"
                ) from None

        if on_stage:
            on_stage("train")
        _warn_if_stderr_undefined(plan)  # after every check (not before a one-line refusal) and the CLI's header
        if unscored:
            _warn.warn(
                f"track_epochs {unscored} are not scored: {out_dir} holds a run already trained for {trained} "
                "epochs without scoring them, and the states of epochs before its newest checkpoint are not kept "
                "(a new out_dir trains from scratch and scores them); tracked epochs: "
                f"{config['scoring']['track_epochs']}",
                UserWarning)
        if rescore:
            # Restores that checkpoint (checking it) and trains nothing; training then resumes
            # from the same checkpoint, as after any stop.
            restored = train(trained, progress=False)
            state_run()
            score_epoch(trained, plan_members(restored.state))
            del restored
        fitted = train(epochs, progress=progress, callback=callback)
        state, history = fitted.state, fitted.history
        del fitted  # its ensemble holds the training copy of the data on the devices
        state_run()

        if on_stage:
            on_stage("likelihood")
        ll_all = np.asarray(loglik(state, num_samples, progress=progress))
        ll = ll_all[:num_plan]
        logp_full = ll_all[num_plan] if full_model else None

        if on_stage:
            on_stage("scores")
        s = memorization_scores(ll, keep, quantile=quantile, mesh=score_mesh)
        if epochs in tracked and last_is_final:
            record(epochs, s.M)
        elif epochs in tracked and epochs not in M_by_epoch:  # all epochs restored: not scored in the callback
            score_epoch(epochs, plan_members(state))
        label_mem = None
        if model_cfg["name"] == "classifier":
            correct = loglik_matrix(graphdef, plan_members(state), data, key=score_key,
                                    kind="correct", mesh=score_mesh, matmul_dtype=matmul_dtype)
            label_mem = np.asarray(feldman_zhang(np.asarray(correct) > 0.5, keep, mesh=score_mesh).mem)
        lev = _leverage_baseline(x) if linear_baseline else None
        fold = np.full(n, -1, np.int32)
        if plan.fold is not None:
            fold = np.asarray(plan.fold)[0].astype(np.int32)
        es = sorted(M_by_epoch)
        config["scoring"]["track_epochs"] = es  # what the result holds, and nothing else
        result = MemorizationResult(
            U=np.asarray(s.U), V=np.asarray(s.V), M=np.asarray(s.M), stderr=np.asarray(s.stderr),
            dof=np.asarray(s.dof), n_in=np.asarray(s.n_in), n_out=np.asarray(s.n_out),
            highly_memorized=np.asarray(s.highly_memorized), threshold=float(s.threshold),
            ll=ll, keep=keep, fold=fold,
            labels=None if y is None else y.astype(np.int32),
            logp_full=logp_full, leverage=lev, label_memorization=label_mem,
            tracked_epochs=np.asarray(es, np.int32),
            M_by_epoch=np.stack([M_by_epoch[e] for e in es]) if es else np.zeros((0, n), np.float32),
            history={k: v[:, :num_plan] for k, v in history.items()},
            config=config,
        )
        if out_dir is not None:
            result.save(out_dir)
            if os.path.exists(os.path.join(out_dir, _RUN_CONFIG)):  # config.json now states the run
                os.remove(os.path.join(out_dir, _RUN_CONFIG))
        return result
