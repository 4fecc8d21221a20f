"""Membership plans: which ensemble member trains on which example.

A :class:`Plan` is a boolean matrix ``keep[models, examples]`` (True where model ``m``
trains on example ``i``) together with the metadata that produced it. Everything
downstream (ensemble training, :mod:`jaxmem.scores`) reads only ``keep``.

Constructors, all seeded with a :class:`numpy.random.Generator` and deterministic,
all O(models * examples) time and memory (the size of ``keep`` itself):

- :func:`kfold`: K folds x R repeats, the design of van den Burg & Williams (2021);
  each example is held out by exactly one model per repeat.
- :func:`random_subsets`: every model trains on a uniformly random subset of exactly
  ``round(rate * n)`` examples (Feldman & Zhang, 2020).
- :func:`balanced_subsets`: every example is in exactly half of the models (as in
  LiRA, Carlini et al., 2022).
- :meth:`Plan.from_keep`: a user-supplied mask.

Examples:
  >>> plan = kfold(1000, k=10, repeats=2, seed=0)
  >>> plan.keep.shape
  (20, 1000)
  >>> int(plan.out_counts().min()), int(plan.in_counts().min())
  (2, 18)
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
import zlib
from typing import Any

import numpy as np

__all__ = [
    "Plan",
    "kfold",
    "random_subsets",
    "balanced_subsets",
    "load_plan",
]

_KINDS = ("kfold", "random", "balanced", "custom")
_FORMAT_VERSION = 1
_METADATA_KEYS = ("format_version", "kind", "n", "num_models", "seed", "k", "repeats", "rate")


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _index_list(idx: np.ndarray, limit: int = 10) -> str:
    """``"3, 8, 9, ..."``: the first ``limit`` indices of ``idx``, and ``...`` if there are more."""
    return ", ".join(str(int(i)) for i in idx[:limit]) + (", ..." if idx.size > limit else "")


def _describe_indices(idx: np.ndarray, limit: int = 10) -> str:
    """``"3 examples: [0, 5, 9]"`` with at most ``limit`` indices shown."""
    noun = "example" if idx.size == 1 else "examples"
    return f"{idx.size} {noun}: [{_index_list(idx, limit)}]"


def _check_keep(keep: Any) -> np.ndarray:
    keep = np.asarray(keep)
    if keep.dtype != np.bool_:
        raise ValueError(
            f"keep must be a boolean array [models, examples], got dtype {keep.dtype} "
            "(convert a 0/1 mask with keep.astype(bool))"
        )
    if keep.ndim != 2:
        raise ValueError(
            f"keep must be 2-D [models, examples], got shape {keep.shape}"
        )
    if keep.shape[0] < 1 or keep.shape[1] < 1:
        raise ValueError(f"keep must have at least one model and one example, got shape {keep.shape}")
    return keep


def _check_int(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum`` (a Python or numpy integer; bools, floats, strings refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_seed(value: Any, name: str = "seed") -> int:
    """A seed of :func:`numpy.random.default_rng`: a non-negative integer (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_fold(fold: Any, keep: np.ndarray, k: int, repeats: int) -> np.ndarray:
    """int32 copy of a k-fold plan's ``fold``, checked against ``keep`` (O(models * examples))."""
    fold = np.asarray(fold)
    if not np.issubdtype(fold.dtype, np.integer):
        raise ValueError(f"fold must be an integer array [repeats, examples], got dtype {fold.dtype}")
    n = keep.shape[1]
    if fold.shape != (repeats, n):
        raise ValueError(f"fold must be [repeats={repeats}, examples={n}], got {fold.shape}")
    bad = np.argwhere((fold < 0) | (fold >= k))
    if bad.size:
        r, i = (int(v) for v in bad[0])
        raise ValueError(
            f"fold values must be folds in [0, {k}); fold[{r}, {i}] = {fold[r, i]} "
            f"({len(bad)} value(s) out of range)"
        )
    fold = np.array(fold, dtype=np.int32, copy=True)
    folds = np.arange(k, dtype=np.int32)[:, None]
    for r in range(repeats):  # one repeat at a time: O(k * n) temporary memory
        wrong = (fold[r][None, :] != folds) != keep[r * k : (r + 1) * k]
        if wrong.any():
            i = int(np.flatnonzero(wrong.any(axis=0))[0])
            out = (r * k + np.flatnonzero(~keep[r * k : (r + 1) * k, i])).tolist()
            raise ValueError(
                f"fold disagrees with keep at example {i}: fold[{r}, {i}] = {fold[r, i]} says "
                f"model {r * k + fold[r, i]} alone holds it out in repeat {r}, but keep has it "
                f"held out by models {out} of models {r * k}..{r * k + k - 1}"
            )
    return fold


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A membership plan: ``keep[models, examples]`` plus how it was made.

    Build one with :func:`kfold`, :func:`random_subsets`, :func:`balanced_subsets` or
    :meth:`Plan.from_keep`; the arrays are read-only.

    Attributes:
      keep: bool ``[models, examples]``; True where model ``m`` trains on example ``i``.
      kind: ``"kfold"``, ``"random"``, ``"balanced"`` or ``"custom"``.
      seed: the seed of the generator that drew the plan (``None`` for custom).
      k: number of folds (kfold only).
      repeats: number of independent fold assignments (kfold only).
      rate: fraction of examples each model trains on (random: as requested;
        balanced: 0.5; kfold: ``(k-1)/k``; custom: ``None``).
      fold: int32 ``[repeats, examples]`` (kfold only): ``fold[r, i]`` is the fold
        that held example ``i`` out in repeat ``r``, i.e. model ``r * k + fold[r, i]``.

    Raises:
      ValueError: ``keep`` is not a 2-D boolean array with a model and an example, an
        unknown ``kind``, a ``seed`` that is not None or a non-negative integer, ``k``,
        ``repeats`` or ``fold`` given for a plan that is not ``"kfold"``, or a
        ``"kfold"`` plan whose parts disagree: it needs ``k >= 2``, ``repeats >= 1``,
        ``k * repeats`` models, ``rate`` None or ``(k-1)/k``, and an integer ``fold``
        ``[repeats, examples]`` in ``[0, k)`` such that model ``r * k + j`` holds out
        exactly the examples with ``fold[r, i] == j`` (the first disagreeing example is
        named); a ``"random"`` plan whose ``rate`` is not in (0, 1) or whose models do not
        each train on ``round(rate * examples)`` examples; a ``"balanced"`` plan with an
        odd number of models, a ``rate`` other than None or 0.5, or an example that is not
        in exactly half of the models; a ``"custom"`` plan with a ``rate``.
    """

    keep: np.ndarray
    kind: str
    seed: int | None = None
    k: int | None = None
    repeats: int | None = None
    rate: float | None = None
    fold: np.ndarray | None = None

    def __post_init__(self):
        keep = _readonly(np.array(_check_keep(self.keep), copy=True))
        object.__setattr__(self, "keep", keep)
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.seed is not None:
            object.__setattr__(self, "seed", _check_seed(self.seed))
        if self.kind != "kfold":
            given = [name for name in ("k", "repeats", "fold") if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"k, repeats and fold describe k-fold plans; a {self.kind!r} plan must leave "
                    f"them None, got {', '.join(given)}"
                )
            self._check_subsets(keep)
            return
        if self.k is None or self.repeats is None or self.fold is None:
            missing = [name for name in ("k", "repeats", "fold") if getattr(self, name) is None]
            raise ValueError(f"a 'kfold' plan needs k, repeats and fold; missing {', '.join(missing)}")
        k = _check_int("k", self.k, 2)
        repeats = _check_int("repeats", self.repeats, 1)
        if keep.shape[0] != k * repeats:
            raise ValueError(
                f"a 'kfold' plan with k={k} and repeats={repeats} has k * repeats = {k * repeats} "
                f"models, but keep has {keep.shape[0]}"
            )
        rate_ok = isinstance(self.rate, (int, float, np.number)) and np.isclose(self.rate, (k - 1) / k, rtol=1e-12)
        if self.rate is not None and not rate_ok:
            raise ValueError(f"a 'kfold' plan with k={k} has rate (k-1)/k = {(k - 1) / k}, got {self.rate!r}")
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "repeats", repeats)
        object.__setattr__(self, "fold", _readonly(_check_fold(self.fold, keep, k, repeats)))

    def _check_subsets(self, keep: np.ndarray) -> None:
        """A "random", "balanced" or "custom" plan's ``rate`` and ``keep`` agree with its kind."""
        num_models, n = keep.shape
        is_real = isinstance(self.rate, (int, float, np.integer, np.floating)) and not isinstance(self.rate, bool)
        if self.kind == "custom":
            if self.rate is not None:
                raise ValueError(f"a 'custom' plan has no rate (it describes random subsets), got {self.rate!r}")
            return
        if self.kind == "balanced":
            if self.rate is not None and not (is_real and self.rate == 0.5):
                raise ValueError(f"a 'balanced' plan has rate 0.5 (each example in half of the models), "
                                 f"got {self.rate!r}")
            if num_models % 2:
                raise ValueError(f"a 'balanced' plan has an even number of models, keep has {num_models}")
            counts = keep.sum(axis=0)
            off = np.flatnonzero(counts != num_models // 2)
            if off.size:
                raise ValueError(
                    f"a 'balanced' plan has every example in exactly {num_models // 2} of its {num_models} models; "
                    f"{_describe_indices(off)} {'is' if off.size == 1 else 'are'} not (example {off[0]} is in "
                    f"{counts[off[0]]}); use Plan.from_keep for another design")
            object.__setattr__(self, "rate", 0.5)
            return
        # "random": every model trains on round(rate * n) examples (random_subsets)
        if not (is_real and 0.0 < self.rate < 1.0):
            raise ValueError(f"a 'random' plan needs its rate, strictly between 0 and 1, got {self.rate!r}")
        size = _subset_size(float(self.rate), n)
        sizes = keep.sum(axis=1)
        off = np.flatnonzero(sizes != size)
        if off.size:
            raise ValueError(
                f"a 'random' plan with rate={self.rate} trains every model on round(rate * n) = {size} of its "
                f"{n} examples; model {off[0]} trains on {sizes[off[0]]} ({off.size} models differ); use "
                f"Plan.from_keep for another design")
        object.__setattr__(self, "rate", float(self.rate))

    # ------------------------------------------------------------------ sizes
    @property
    def n(self) -> int:
        """Number of examples."""
        return int(self.keep.shape[1])

    @property
    def num_models(self) -> int:
        """Number of models (ensemble members)."""
        return int(self.keep.shape[0])

    # --------------------------------------------------------------- builders
    @classmethod
    def from_keep(cls, keep: Any) -> Plan:
        """Wrap a user-supplied mask (e.g. from cached model outputs).

        Args:
          keep: bool ``[models, examples]``.

        Returns:
          A ``"custom"`` plan. Coverage is not enforced here; call :meth:`validate`.

        Raises:
          ValueError: if ``keep`` is not a 2-D boolean array with at least one model
            and one example.
        """
        return cls(keep=keep, kind="custom")  # __post_init__ checks and copies keep

    # --------------------------------------------------------------- coverage
    def in_counts(self) -> np.ndarray:
        """int64 ``[examples]``: how many models train on each example."""
        return self.keep.sum(axis=0, dtype=np.int64)

    def out_counts(self) -> np.ndarray:
        """int64 ``[examples]``: how many models hold each example out."""
        return self.num_models - self.in_counts()

    def missing_in(self) -> np.ndarray:
        """Indices of examples that no model trains on (no "in" model)."""
        return np.flatnonzero(self.in_counts() == 0)

    def missing_out(self) -> np.ndarray:
        """Indices of examples that every model trains on (no "out" model)."""
        return np.flatnonzero(self.out_counts() == 0)

    def validate(self) -> Plan:
        """Check that every example has at least one "in" and one "out" model.

        Returns:
          ``self``, so that ``plan = kfold(...).validate()`` reads naturally.

        Raises:
          ValueError: naming the first few offending examples and their count.
        """
        problems = []
        missing_in, missing_out = self.missing_in(), self.missing_out()
        if missing_in.size:
            problems.append(f"no model trains on {_describe_indices(missing_in)}")
        if missing_out.size:
            problems.append(f"no model holds out {_describe_indices(missing_out)}")
        if problems:
            raise ValueError(
                "membership plan does not cover every example: "
                + "; ".join(problems)
                + " (each example needs at least one 'in' and one 'out' model)"
            )
        return self

    # --------------------------------------------------------------- per model
    def train_indices(self, m: int) -> np.ndarray:
        """Sorted indices of the examples model ``m`` trains on."""
        return np.flatnonzero(self.keep[self._model(m)])

    def heldout_indices(self, m: int) -> np.ndarray:
        """Sorted indices of the examples model ``m`` holds out."""
        return np.flatnonzero(~self.keep[self._model(m)])

    def fold_of_example(self, i: int) -> np.ndarray:
        """int32 ``[repeats]``: the fold holding example ``i`` out in each repeat (kfold)."""
        if self.fold is None:
            raise ValueError(f"fold_of_example needs a kfold plan, this one is {self.kind!r}")
        if not 0 <= i < self.n:
            raise IndexError(f"example {i} out of range for a plan of {self.n} examples")
        return self.fold[:, i]

    def _model(self, m: int) -> int:
        if not 0 <= m < self.num_models:
            raise IndexError(f"model {m} out of range for a plan of {self.num_models} models")
        return m

    # -------------------------------------------------------------------- I/O
    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description (everything but the arrays)."""
        return {
            "format_version": _FORMAT_VERSION,
            "kind": self.kind,
            "n": self.n,
            "num_models": self.num_models,
            "seed": self.seed,
            "k": self.k,
            "repeats": self.repeats,
            "rate": self.rate,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan to ``path`` (an ``.npz`` file: ``keep``, ``fold``, JSON metadata).

        The file is written to exactly ``path`` (no suffix is appended), whole or not at
        all (under a temporary name, then renamed: a full disk leaves an earlier file as it
        was, and the ``OSError`` names ``path``), and is read back losslessly by
        :func:`load_plan`.
        """
        from jaxmem.checkpoint import _write_atomically  # orbax's module: only when saving (it expands "~")

        arrays = {
            "keep": self.keep,
            "metadata": np.array(json.dumps(self.metadata())),
        }
        if self.fold is not None:
            arrays["fold"] = self.fold
        _write_atomically(path, lambda f: np.savez_compressed(f, **arrays), binary=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (
            self.metadata() == other.metadata()
            and np.array_equal(self.keep, other.keep)
            and (self.fold is None) == (other.fold is None)
            and (self.fold is None or np.array_equal(self.fold, other.fold))
        )

    __hash__ = None  # type: ignore[assignment]  # arrays make plans unhashable

    def __repr__(self) -> str:
        meta = {k: v for k, v in self.metadata().items() if v is not None and k != "format_version"}
        return "Plan(" + ", ".join(f"{k}={v!r}" for k, v in meta.items()) + ")"


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a plan written by :meth:`Plan.save`.

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the path, if it is a directory, not a readable ``.npz``
        archive, not a jaxmem plan (no ``keep`` or ``metadata``, metadata that is not a
        JSON object with every key :meth:`Plan.metadata` writes, an unknown format
        version), or its contents disagree with its metadata or with each other (see
        :class:`Plan`).
    """
    name = path = os.path.expanduser(os.fspath(path))
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise _NotAPlan("a single .npy array; a plan is an .npz archive with 'keep' and 'metadata'")
        with z:
            if "keep" not in z or "metadata" not in z:
                raise _NotAPlan("needs an .npz archive with 'keep' and 'metadata'")
            text = str(z["metadata"])
            keep = z["keep"]
            fold = z["fold"] if "fold" in z else None
    except FileNotFoundError:
        raise
    except _NotAPlan as err:
        raise ValueError(f"{name!r} is not a jaxmem plan ({err})") from None
    except IsADirectoryError:
        raise ValueError(f"{name!r} is a directory; give a plan file written by Plan.save") from None
    except ValueError:  # numpy's text here suggests unpickling, which a plan never needs
        raise ValueError(f"{name!r} is not a jaxmem plan file (not an .npz archive of plain arrays)") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{name!r} is not a readable .npz archive ({type(err).__name__}: {err})") from None
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{name!r}: the plan metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{name!r}: the plan metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{name!r}: unsupported plan format version {meta.get('format_version')!r}")
    missing = [key for key in _METADATA_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{name!r}: the plan metadata lacks {', '.join(missing)}")
    if keep.shape != (meta["num_models"], meta["n"]):
        raise ValueError(
            f"{name!r}: plan file is inconsistent: keep has shape {keep.shape}, metadata says "
            f"({meta['num_models']}, {meta['n']})"
        )
    try:
        return Plan(
            keep=keep,
            kind=meta["kind"],
            seed=meta["seed"],
            k=meta["k"],
            repeats=meta["repeats"],
            rate=meta["rate"],
            fold=fold,
        )
    except ValueError as err:
        raise ValueError(f"{name!r}: {err}") from None


class _NotAPlan(Exception):
    """An archive without a plan's arrays (internal to :func:`load_plan`)."""


# ---------------------------------------------------------------- constructors


def kfold(n: int, k: int, repeats: int = 1, seed: int = 0) -> Plan:
    """K-fold plan with ``repeats`` independent fold assignments.

    In each repeat the examples are randomly permuted and dealt round-robin into
    ``k`` folds (fold sizes differ by at most one); model ``r * k + j`` trains on
    every example except fold ``j`` of repeat ``r``. Each example therefore has
    ``repeats`` "out" models (one per repeat) and ``repeats * (k - 1)`` "in" models.
    O(repeats * k * n): one permutation per repeat, no pairwise comparisons.

    Args:
      n: number of examples.
      k: number of folds, ``2 <= k <= n``.
      repeats: number of independent fold assignments, ``>= 1``.
      seed: seed of the :class:`numpy.random.Generator`, a non-negative integer.

    Returns:
      A plan with ``repeats * k`` models and ``fold[repeats, n]``.

    Raises:
      ValueError: for ``k < 2``, ``k > n``, ``repeats < 1`` or a ``seed`` that is not
        a non-negative integer.

    References:
      van den Burg & Williams, "On Memorization in Probabilistic Deep Generative
      Models", NeurIPS 2021 (K = 10, R = 10).
    """
    n = _check_int("n", n, 1)
    k = _check_int("k", k, 2)
    repeats = _check_int("repeats", repeats, 1)
    seed = _check_seed(seed)
    if k > n:
        raise ValueError(f"k={k} folds need at least k examples, got n={n}")
    rng = np.random.default_rng(seed)
    dealt = (np.arange(n) % k).astype(np.int32)
    fold = np.empty((repeats, n), dtype=np.int32)
    for r in range(repeats):
        fold[r, rng.permutation(n)] = dealt
    # keep[r, j, i] = fold[r, i] != j, then repeat-major model order r * k + j.
    keep = fold[:, None, :] != np.arange(k, dtype=np.int32)[None, :, None]
    return Plan(
        keep=keep.reshape(repeats * k, n),
        kind="kfold",
        seed=seed,
        k=k,
        repeats=repeats,
        rate=(k - 1) / k,
        fold=fold,
    )


def _subset_size(rate: float, n: int) -> int:
    """Examples per model of a "random" plan of ``n`` examples: ``round(rate * n)``."""
    return int(round(rate * n))


def random_subsets(n: int, num_models: int, rate: float, seed: int = 0) -> Plan:
    """Each model trains on a uniformly random subset of exactly ``round(rate * n)`` examples.

    Subset sizes are fixed (not Bernoulli per example) so that every model sees the
    same amount of data, as in Feldman & Zhang (2020); the subsets of different
    models are independent, so an example's number of "in" models is
    Binomial-like and may be 0 or ``num_models`` for small ensembles: check with
    :meth:`Plan.validate` or :meth:`Plan.missing_in` / :meth:`Plan.missing_out`.

    Args:
      n: number of examples.
      num_models: number of models, ``>= 2``.
      rate: fraction of examples per model, strictly between 0 and 1.
      seed: seed of the :class:`numpy.random.Generator`, a non-negative integer.

    Raises:
      ValueError: for ``rate`` outside (0, 1), ``num_models < 2``, a rate that
        rounds to an empty or full subset, or a ``seed`` that is not a non-negative
        integer.
    """
    n = _check_int("n", n, 1)
    num_models = _check_int("num_models", num_models, 2)
    seed = _check_seed(seed)
    rate = float(rate)
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be strictly between 0 and 1, got {rate}")
    size = _subset_size(rate, n)
    if not 0 < size < n:
        raise ValueError(
            f"rate={rate} of n={n} examples rounds to {size} per model; each model needs "
            "at least one example in and one out"
        )
    rng = np.random.default_rng(seed)
    keep = np.zeros((num_models, n), dtype=bool)
    for m in range(num_models):
        keep[m, rng.choice(n, size=size, replace=False)] = True
    return Plan(keep=keep, kind="random", seed=seed, rate=rate)


def balanced_subsets(n: int, num_models: int, seed: int = 0) -> Plan:
    """Each example is in exactly half of the models (LiRA's design).

    For every example an independent uniformly random half of the models trains on
    it, so each example has ``num_models / 2`` "in" and "out" models; model training
    set sizes vary around ``n / 2``. O(n * num_models * log(num_models)).

    Args:
      n: number of examples.
      num_models: an even number of models, ``>= 2``.
      seed: seed of the :class:`numpy.random.Generator`, a non-negative integer.

    Raises:
      ValueError: for ``num_models < 2``, odd ``num_models`` or a ``seed`` that is
        not a non-negative integer.

    References:
      Carlini et al., "Membership Inference Attacks From First Principles", 2022.
    """
    n = _check_int("n", n, 1)
    num_models = _check_int("num_models", num_models, 2)
    seed = _check_seed(seed)
    if num_models % 2:
        raise ValueError(f"balanced_subsets needs an even num_models, got {num_models}")
    rng = np.random.default_rng(seed)
    # argsort of iid uniforms is a uniformly random permutation per column.
    order = rng.random((num_models, n)).argsort(axis=0)
    return Plan(keep=order < num_models // 2, kind="balanced", seed=seed, rate=0.5)
