"""Models with one interface for training and scoring (docs/CONTRACTS.md).

Every model is a Flax NNX module with, per example and in nats:

- ``loss(batch, key) -> f32[B]``: the training loss (negative ELBO, cross-entropy);
- ``log_prob(batch, keys, num_samples) -> f32[B]``: importance-weighted log p(x)
  (exact log p(y|x) for the classifier), one PRNG key per example;
- ``elbo(batch, keys, num_samples=1) -> f32[B]``.

Build one from a JSON-serialisable configuration::

    cfg = jaxmem.models.model_config("mlp_vae", (32, 32), hidden=[512, 256])
    model = jaxmem.models.from_config(cfg, seed=0)
    # equivalently
    model = jaxmem.models.create("mlp_vae", (32, 32), seed=0, hidden=[512, 256])
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from typing import Any, Literal, overload

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmem.models._latent import LatentVariableModel as LatentVariableModel
from jaxmem.models.classifier import Classifier as Classifier
from jaxmem.models.linear_gaussian import LinearGaussianVAE as LinearGaussianVAE
from jaxmem.models.vae import MLPVAE as MLPVAE, ConvVAE as ConvVAE

__all__ = [
    "MODELS",
    "create",
    "model_config",
    "from_config",
    "check_data",
    "check_model_data",
    "whole_number_labels",
    "MLPVAE",
    "ConvVAE",
    "LinearGaussianVAE",
    "Classifier",
    "LatentVariableModel",
]

#: Registered model names and their classes.
MODELS: dict[str, type[nnx.Module]] = {
    "mlp_vae": MLPVAE,
    "conv_vae": ConvVAE,
    "linear_gaussian_vae": LinearGaussianVAE,
    "classifier": Classifier,
}


def _defaults(cls) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {
        k: p.default
        for k, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "rngs"
    }


def _plain(v: Any) -> Any:
    """``v`` with numpy scalars and arrays as Python values and tuples as lists (for JSON)."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (tuple, list)):
        return [_plain(e) for e in v]
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_ints(what: str, value: Any, default: Any) -> None:
    """Refuse ``value`` (already :func:`_plain`) where the option's ``default`` is an int or ints.

    A float such as 4.5 would otherwise be truncated silently by the layer sizes.
    """
    if _is_int(default) and not _is_int(value):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if isinstance(default, tuple) and default and all(_is_int(d) for d in default):
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            raise ValueError(f"{what} must be a sequence of integers, got {value!r}")


def model_config(name: str, example_shape: Sequence[int], **kwargs: Any) -> dict[str, Any]:
    """The full, JSON-serialisable configuration of a model: name, shape, every option.

    Defaults are filled in, so two configurations compare equal exactly when they build
    the same architecture (what checkpoints and result files record and check).

    Args:
      name: one of :data:`MODELS`.
      example_shape: shape of one example.
      **kwargs: the model's keyword options (see each class).

    Returns:
      ``{"name": ..., "example_shape": [...], **options}`` (tuples become lists, numpy
      scalars and arrays Python numbers and lists).

    Raises:
      ValueError: an unknown model or option; an ``example_shape`` that is empty or not
        positive integers; an integer option (``latent_dim``, ``dense``, ``num_classes``,
        the sizes in ``hidden`` or ``channels``) given a float such as 4.5 or a bool.
      TypeError: an option that is not JSON-serialisable.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    defaults = _defaults(MODELS[name])
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; it takes {sorted(defaults)}")
    shape = _plain(list(example_shape) if isinstance(example_shape, Sequence) else example_shape)
    if not isinstance(shape, list) or not shape or not all(_is_int(s) and s >= 1 for s in shape):
        raise ValueError(f"example_shape must be a non-empty sequence of positive integers, got {example_shape!r}")
    cfg = {"name": name, "example_shape": shape}
    for k, v in defaults.items():
        cfg[k] = _plain(kwargs.get(k, v))
        _check_ints(f"option {k!r} of model {name!r}", cfg[k], v)
    json.dumps(cfg)  # fail here, not when a checkpoint is written
    return cfg


def from_config(config: dict[str, Any], *, seed: int) -> LatentVariableModel | Classifier:
    """Build the model described by ``config`` (from :func:`model_config`), initialised from ``seed``."""
    cfg = dict(config)
    try:
        name, shape = cfg.pop("name"), cfg.pop("example_shape")
    except KeyError as e:
        raise ValueError(f"model config lacks {e.args[0]!r}: {config}") from None
    cfg = model_config(name, shape, **cfg)  # validate and fill defaults
    del cfg["name"], cfg["example_shape"]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return MODELS[name](tuple(shape), **kwargs, rngs=nnx.Rngs(seed))


# The model each name builds, for type checkers (create("linear_gaussian_vae", ...).exact_log_prob).
@overload
def create(name: Literal["mlp_vae"], example_shape: Sequence[int], *, seed: int, **kwargs: Any) -> MLPVAE: ...
@overload
def create(name: Literal["conv_vae"], example_shape: Sequence[int], *, seed: int, **kwargs: Any) -> ConvVAE: ...
@overload
def create(name: Literal["linear_gaussian_vae"], example_shape: Sequence[int], *, seed: int,
           **kwargs: Any) -> LinearGaussianVAE: ...
@overload
def create(name: Literal["classifier"], example_shape: Sequence[int], *, seed: int, **kwargs: Any) -> Classifier: ...
@overload
def create(name: str, example_shape: Sequence[int], *, seed: int,
           **kwargs: Any) -> LatentVariableModel | Classifier: ...
def create(name: str, example_shape: Sequence[int], *, seed: int, **kwargs: Any) -> LatentVariableModel | Classifier:
    """Build model ``name`` for examples of shape ``example_shape``, initialised from ``seed``.

    Args:
      name: ``"mlp_vae"``, ``"conv_vae"``, ``"linear_gaussian_vae"`` or ``"classifier"``.
      example_shape: shape of one example (e.g. ``(32, 32)``, ``(32, 32, 3)``, ``(d,)``).
      seed: parameter initialisation seed.
      **kwargs: model options (see :class:`MLPVAE`, :class:`ConvVAE`,
        :class:`LinearGaussianVAE`, :class:`Classifier`).

    Returns:
      An ``nnx.Module`` with ``loss``, ``log_prob`` and ``elbo``.
    """
    return from_config(model_config(name, example_shape, **kwargs), seed=seed)


def _first_bad(x: np.ndarray, is_bad, rows: int = 4096) -> tuple[int, float] | None:
    """(example index, value) of the first entry of ``x`` where ``is_bad`` holds, or None.

    Scans ``rows`` examples at a time, so the boolean temporaries stay small whatever
    the size of the data set.
    """
    flat = x.reshape(len(x), -1)
    for start in range(0, len(flat), rows):
        bad = is_bad(flat[start:start + rows])
        if bad.any():
            r = int(np.argmax(bad.any(axis=1)))
            return start + r, float(flat[start + r][np.argmax(bad[r])])
    return None


def check_data(config: dict[str, Any], x: Any, y: Any = None) -> np.ndarray | None:
    """Check that ``x`` (and ``y``) are data the model of ``config`` has a likelihood for.

    The models do not check value ranges inside their jitted programs, and out-of-range
    values give silently wrong scores rather than errors: a Bernoulli draw with ``p > 1``
    is always 1 (so 8-bit pixel values 0..255 would all binarise to 1), the conv VAE
    clips pixels to [0, 1], and a classifier label stored as a float is truncated. So
    :func:`jaxmem.memorization` calls this before anything is trained:

    - ``mlp_vae``: pixel intensities in [0, 1] (``binarize="dynamic"``), or exactly 0
      or 1 (``binarize="none"``, the Bernoulli likelihood of binary data);
    - ``conv_vae``: pixel values in [0, 1] (8-bit images as ``k / 255``);
    - ``classifier``: labels ``y`` given, whole numbers in ``[0, num_classes)``;
    - ``linear_gaussian_vae``: any real values.

    Finiteness and shapes are checked by the caller.

    Args:
      config: a model configuration (:func:`model_config`).
      x: f32 ``[n, *example_shape]`` examples.
      y: ``[n]`` labels or None.

    Returns:
      The classifier's labels as int32 ``[n]`` (whole-number floats accepted), else ``y``
      unchanged.

    Raises:
      ValueError: naming the first offending example, its value and the allowed range.
    """
    name = config["name"]
    x = np.asarray(x)
    if name == "mlp_vae" and config.get("binarize", "dynamic") == "none":
        first = _first_bad(x, lambda a: (a != 0) & (a != 1))
        if first is not None:
            raise ValueError(
                f"model 'mlp_vae' with binarize='none' has a Bernoulli likelihood of binary data: x must "
                f"be 0 or 1, but example {first[0]} has {first[1]:g} (binarize='dynamic' takes "
                f"intensities in [0, 1])")
    elif name in ("mlp_vae", "conv_vae") and len(x):
        lo, hi = x.min(), x.max()  # one pass each; the example is looked for only if needed
        if lo < 0 or hi > 1:
            i, v = _first_bad(x, lambda a: (a < 0) | (a > 1))
            if name == "mlp_vae":
                raise ValueError(
                    f"model 'mlp_vae' binarizes pixel intensities, which must lie in [0, 1], but example {i} "
                    f"has {v:g} (x spans [{lo:g}, {hi:g}]; divide 8-bit images by 255)")
            raise ValueError(
                f"model 'conv_vae' takes pixel values in [0, 1] (8-bit images as k / 255), but example {i} has "
                f"{v:g} (x spans [{lo:g}, {hi:g}])")
    elif name == "classifier":
        if y is None:
            raise ValueError("model 'classifier' needs labels y (int [n] in [0, num_classes)); none were given")
        y = whole_number_labels(y, "model 'classifier' needs")
        k = int(config.get("num_classes", 10))
        bad = (y < 0) | (y >= k)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"label {y[i]:g} of example {i} lies outside [0, {k}) (the classifier's "
                             f"num_classes is {k}; set model_options={{'num_classes': ...}})")
        return y.astype(np.int32)
    return y


def whole_number_labels(y: Any, must: str = "labels must be") -> np.ndarray:
    """``y`` as a numpy array if it holds whole numbers (integers, or floats such as a CSV
    column's 3.0); else a ValueError beginning with ``must`` (e.g. ``"y must hold"``)."""
    y = np.asarray(y)
    if y.dtype == bool or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{must} integer labels, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{must} whole-number labels, but example {i} has label {float(y[i]):g}")
    return y


def check_model_data(model: nnx.Module, data: Any) -> None:
    """:func:`check_data` for a model instance, where it is one of jaxmem's models.

    For :class:`MLPVAE`, :class:`ConvVAE` and :class:`Classifier` instances (subclasses
    included; an abstract module from ``nnx.eval_shape`` will do, only its class and
    options are read) the value ranges of :func:`check_data`; nothing for other models,
    whose contracts jaxmem does not know. For all four of jaxmem's models also the
    data's layout and type: one floating-point array ``x`` for the VAEs, ``(x, y)``
    with floating-point ``x`` for the classifier (float16 and bfloat16 included: the
    models compute in float32 from them, the same numbers as float32 ``x`` holding the
    same values). :func:`jaxmem.ensemble.fit` and
    :func:`jaxmem.likelihood.loglik_matrix` call it, so data out of range is refused
    there too, not only by :func:`jaxmem.memorization`.

    Args:
      model: an ``nnx.Module``.
      data: the batch pytree of all examples: ``x [n, ...]``, or ``(x, y)`` for the
        classifier (another layout is left to the model's own error).

    Raises:
      ValueError: as :func:`check_data`.
    """
    if not isinstance(model, (MLPVAE, ConvVAE, LinearGaussianVAE, Classifier)):
        return
    name = type(model).__name__
    if isinstance(model, Classifier):
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            return  # the model's own check names the layout it needs
        x = data[0]
    elif isinstance(data, (tuple, list, dict)):
        raise ValueError(f"{name} takes its data as one array x [n, *example_shape], got a {type(data).__name__}")
    else:
        x = data
    dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if not jnp.issubdtype(dtype, jnp.floating):  # np.issubdtype says no to ml_dtypes' bfloat16
        raise ValueError(f"{name} takes floating-point x (e.g. x.astype(np.float32)), got dtype {dtype}")
    if isinstance(model, MLPVAE):
        check_data({"name": "mlp_vae", "binarize": model.binarize}, x)
    elif isinstance(model, ConvVAE):
        check_data({"name": "conv_vae"}, x)
    elif isinstance(model, Classifier):
        check_data({"name": "classifier", "num_classes": model.num_classes}, x, data[1])
