"""The whole ensemble of a membership plan trained in one jitted program.

Every member of a plan (``keep[m, i]``: member ``m`` trains on example ``i``) is the same
Flax NNX model with its own parameters. The model is split once into
``(graphdef, params, rest)``; the members' states are stacked on a leading axis of size
``members``; one pure step (loss, gradient, optax update) is vmapped over members and
``lax.scan``-ned over the steps of an epoch; the member axis is split over a 1-D device
mesh with :func:`jaxmem.mesh.shard_examples` (members are the "rows"). The data lie on
the device once and each member's batches are gathered on the device by index.

Two levels, each usable alone (as in optax / blackjax):

* :func:`make` returns an :class:`Ensemble`: pure ``init`` / ``step`` / ``epoch`` /
  ``schedule`` / ``evaluate`` functions over an :class:`EnsembleState`; the jitted ones
  are safe to call in a user's own loop, also inside the user's own ``jax.jit`` or
  ``lax.scan`` (on CPUs they are then compiled as part of the user's program, without
  :data:`jaxmem.mesh.CPU_COMPILER_OPTIONS`).
* :func:`fit` runs epochs with a progress bar, logs per-member losses, checkpoints to
  a run directory with :mod:`jaxmem.checkpoint` and resumes from it.

Batch schedules. Every epoch has the same number of steps for every member,
``steps_per_epoch = ceil(max_m |train_m| / batch_size)`` unless :func:`make` is given
another, so that one scanned program serves all members. Member ``m``'s schedule for
epoch ``e`` is a uniformly random permutation of ITS OWN training indices (an ``argsort``
of uniform keys with its held-out examples' keys set to 2, i.e. sorted to the end), read
cyclically to fill ``slots = steps_per_epoch * batch_size`` slots: with
``|train_m| <= slots`` every training example of ``m`` is seen ``floor(slots / |train_m|)``
or one more times per epoch (at least once; a member with far fewer examples than the
largest one sees each several times), with ``|train_m| > slots`` (an explicit, smaller
``steps_per_epoch``) a fresh random subset of ``slots`` distinct examples; no member ever
gathers an example it does not keep. The epoch is ``EnsembleState.epoch``, which only
``Ensemble.epoch`` advances: a loop of ``schedule`` and ``step`` must advance it itself
(``state = state._replace(epoch=state.epoch + 1)`` after each epoch's steps), or every
epoch repeats the first one's permutation.

Modes. Training runs the module as :func:`make` gets it (a new ``nnx`` module is in
train mode: ``BatchNorm`` normalises with the batch's statistics and updates its running
averages, ``Dropout`` drops); its other variables (batch statistics, the RNG counts of
the module's own ``nnx.Rngs``) are carried per member in ``EnsembleState.rest``. The
held-out evaluation (``evaluate``, ``epoch``'s ``heldout_loss``) runs each member in
eval mode (``Module.eval()``: ``deterministic=True``, ``use_running_average=True``), so
that its losses do not depend on ``eval_batch_size`` or on the other examples of a
chunk, and leaves ``rest`` unchanged.

Randomness depends only on (seed, member, epoch, step), never on the device count or on
interruptions, so a resumed run continues bit for bit where float rounding is the same:
on as many devices (the count changes how XLA compiles the program, and so its rounding:
:func:`fit` records it in ``run_dir`` and refuses a resume on another) and under the same
jax, jaxlib, flax and optax versions (recorded too; a resume under others warns, as its
numbers then match neither version's uninterrupted run). Seeds lie in ``[0, 2**32)`` and
keys are threefry2x32 whatever ``jax_default_prng_impl`` says (:func:`seed_key`). With
``member_key = fold_in(key(seed), m)``:

* schedule of epoch ``e``: ``fold_in(fold_in(member_key, 0), e)``;
* loss key of global step ``t``: ``fold_in(fold_in(member_key, 1), t)``;
* held-out evaluation, chunk ``c``: ``fold_in(fold_in(member_key, 2), c)`` (the same
  every epoch, so held-out losses of successive epochs are comparable);
* initialisation: ``model_fn(member_init_seed(seed, m))`` when a factory is given; from
  one module instance, every member starts from its parameters, and member ``m >= 1``'s
  PRNG keys held in the module (an ``nnx.Dropout``'s ``rngs``) are the instance's folded
  with ``m`` (member 0 keeps the instance's), so members draw their own dropout masks.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmem import _warn, models as _models
from jaxmem.membership import _check_int, _check_keep, _check_seed, _index_list
from jaxmem.mesh import (
    _more_devices_advice,
    as_mesh,
    compiler_options,
    jit_with_options,
    make_mesh,
    nonfinite_rows,
    on_cpu,
    shard_examples,
)
from jaxmem.models._latent import reverse_mode_dense

__all__ = [
    "EnsembleState",
    "Ensemble",
    "FitResult",
    "TrainingDivergedError",
    "make",
    "fit",
    "member",
    "member_init_seed",
    "seed_key",
    "default_mesh",
    "plan_fingerprint",
]

log = logging.getLogger(__name__)


class EnsembleState(NamedTuple):
    """Training state of all members, stacked on axis 0 (size ``members``).

    Attributes:
      params: ``nnx.State`` of the trainable ``nnx.Param`` variables, leaves ``[members, ...]``.
      rest: ``nnx.State`` of every other variable (batch statistics, RNG counters, ...),
        leaves ``[members, ...]``; carried through the loss so modules may update it.
      opt_state: the optax state of every member, leaves ``[members, ...]``.
      keys: ``[members]`` typed PRNG keys, ``fold_in(key(seed), m)``.
      epoch: int32 ``[]``, epochs completed: advanced by ``Ensemble.epoch`` only (a loop
        of ``step`` advances it itself, see :class:`Ensemble`); it picks the epoch's batch
        schedule.
      step: int32 ``[]``, optimizer steps taken (global, over all epochs).
      plan_id: str, the fingerprint of the membership plan the members train on
        (:attr:`Ensemble.plan_id`, set by ``init``). Not an array: static pytree data,
        kept by ``jax.tree.map``, ``_replace``, jit and scan, and compared by ``step``,
        ``epoch``, ``schedule`` and ``evaluate`` at trace time (free once compiled), so
        that a state of another plan's ensemble (same model, optimizer and member count,
        other held-out examples) is refused instead of training each member on examples
        its own plan held out.
    """

    params: Any
    rest: Any
    opt_state: Any
    keys: jax.Array
    epoch: jax.Array
    step: jax.Array
    plan_id: str | None = None


_STATE_FIELDS = EnsembleState._fields[:-1]  # the array fields; plan_id is static


def _state_flatten_with_keys(s: EnsembleState):
    return tuple((jax.tree_util.GetAttrKey(f), getattr(s, f)) for f in _STATE_FIELDS), s.plan_id


jax.tree_util.register_pytree_with_keys(
    EnsembleState,
    _state_flatten_with_keys,
    lambda plan_id, children: EnsembleState(*children, plan_id=plan_id),
    flatten_func=lambda s: (tuple(s[:-1]), s.plan_id),
)


def plan_fingerprint(keep: Any) -> str:
    """A short fingerprint of a membership plan: 16 hex digits of the sha256 of ``keep``
    (bool ``[members, examples]``, its shape and bytes), as in :attr:`EnsembleState.plan_id`."""
    from jaxmem.checkpoint import fingerprint_array

    return fingerprint_array(np.asarray(keep, dtype=bool))[:16]


class Ensemble(NamedTuple):
    """Pure functions that train all members of a plan together (see :func:`make`).

    Attributes:
      graphdef: the model's ``nnx.GraphDef``; ``nnx.merge(graphdef, params_m, rest_m)``
        is member ``m``.
      init: ``init(seed) -> EnsembleState`` (Python: builds the members' modules).
      step: jitted ``step(state, batch) -> (state, loss)``, one optimizer step of every
        member; ``batch`` leaves ``[members, batch_size, ...]``, ``loss`` f32
        ``[members]`` mean training loss of the batch (nats per example), before the
        step. Advances ``state.step``, never ``state.epoch``.
      epoch: jitted ``epoch(state, data) -> (state, metrics)``: one scanned epoch of
        every member over its own schedule, then the held-out evaluation.
        ``metrics = {"train_loss": f32[members], "heldout_loss": f32[members]}``, nats per
        example (``heldout_loss`` is NaN for a member with no held-out example).
      schedule: jitted ``schedule(state) -> int32[members, steps_per_epoch, batch_size]``,
        the example indices of epoch ``state.epoch``. ``Ensemble.epoch`` is ``step`` over
        them, then ``state.epoch + 1``; a loop of your own does the same::

          idx = ens.schedule(state)
          for s in range(ens.steps_per_epoch):
              state, loss = ens.step(state, jax.tree.map(lambda a: a[idx[:, s]], data))
          state = state._replace(epoch=state.epoch + 1)  # else the next epoch repeats this one

      evaluate: jitted ``evaluate(state, data) -> f32[members]``, each member's mean loss
        over ITS held-out examples (nats per example), in eval mode (see the module
        docstring).
      keep: bool ``[members, examples]`` numpy copy of the plan.
      steps_per_epoch: optimizer steps per epoch (the same for every member; see
        :func:`make`).
      batch_size: examples per member per step.
      mesh: the 1-D mesh the member axis is split over.
      member_chunk: ``member_chunk(state) -> int``, how many of a device's members
        ``epoch`` trains side by side (vmapped) at a time: the ``member_chunk`` given to
        :func:`make`, or the one it picks for this state's sizes (see there), at most
        the device's share of the members.
      check_data: ``check_data(data) -> data``, what ``epoch`` and ``evaluate`` check:
        shapes every call; NaN or inf, and a jaxmem model's value range and dtype, once
        per data object (raises ValueError naming the problem). It remembers the data last
        checked by weak references only: neither the ensemble nor a :class:`FitResult`
        keeps the data alive.
      plan_id: :func:`plan_fingerprint` of ``keep``; the states ``init`` makes carry it,
        and ``step``/``epoch``/``schedule``/``evaluate`` refuse a state with another.
    """

    graphdef: Any
    init: Callable[[int], EnsembleState]
    step: Callable[..., tuple[EnsembleState, jax.Array]]
    epoch: Callable[..., tuple[EnsembleState, dict[str, jax.Array]]]
    schedule: Callable[[EnsembleState], jax.Array]
    evaluate: Callable[..., jax.Array]
    keep: np.ndarray
    steps_per_epoch: int
    batch_size: int
    mesh: Mesh
    member_chunk: Callable[[EnsembleState], int]
    check_data: Callable[[Any], Any]
    plan_id: str


def _path_name(path: tuple) -> str:
    """A state leaf's path as the model's attribute path, e.g. ``"encoder.layers.0.kernel"``."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(parts[:-1] if parts and parts[-1] in ("value", "raw_value") else parts)


class TrainingDivergedError(FloatingPointError):
    """:func:`fit` stopped: a member's training loss became NaN or infinite.

    Its parameters are then non-finite for good, and so would be its log-likelihoods
    and every score that uses them. The epoch that diverged is not checkpointed, so the
    run directory keeps the last finite state.
    """


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      graphdef: ``nnx.GraphDef`` of the model (``nnx.split(model)[0]``).
      state: the members' full ``nnx.State`` (params and the rest), leaves
        ``[members, ...]``: ``nnx.merge(graphdef, jax.tree.map(lambda a: a[m], state))``
        is member ``m`` (docs/CONTRACTS.md).
      train_state: the final :class:`EnsembleState` (optimizer state included).
      history: ``{"train_loss": f32[epochs, members], "heldout_loss": f32[epochs, members]}``
        numpy arrays, nats per example, one row per completed epoch (restored ones included).
      ensemble: the :class:`Ensemble` that trained it.
    """

    graphdef: Any
    state: Any
    train_state: EnsembleState
    history: dict[str, np.ndarray]
    ensemble: Ensemble


def _check_key_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, 2**32)``: a run's seed, which JAX keys take.

    ``jax.random.key`` keeps 32 bits of a seed with ``jax_enable_x64`` off and 64 with it
    on, so a larger seed would draw the same members, batches and samples as its low 32
    bits, or other ones with x64: refused instead (bools, floats and negatives too).
    """
    seed = _check_seed(seed, name)
    if seed >= 2**32:
        raise ValueError(f"{name} must be below 2**32, got {seed}: JAX keys take 32 bits of it (seeds "
                         f"2**32 apart would train and score the same members); use {seed % 2**32} or "
                         "another seed below 2**32")
    return seed


def seed_key(seed: int) -> jax.Array:
    """The root key of a run: ``jax.random.key(seed, impl="threefry2x32")``, whatever
    ``jax_default_prng_impl`` says (``rbg`` keys drawn under ``vmap`` depend on the batch
    they are drawn with, so schedules and samples would depend on the chunking)."""
    return jax.random.key(_check_key_seed(seed), impl="threefry2x32")


def member_init_seed(seed: int, m: int) -> int:
    """The integer seed member ``m`` of a run with ``seed`` is initialised from.

    ``model_fn(member_init_seed(seed, m))`` rebuilds member ``m``'s initial parameters.
    Derived with ``jax.random`` from ``fold_in(key(seed), m)`` so that runs with nearby
    seeds do not share members.
    """
    k = jax.random.fold_in(jax.random.fold_in(seed_key(seed), m), 3)
    # int32 (as the schedule's keys are float32) whatever jax_enable_x64: the same seed starts
    # the same members and draws the same batches with and without it.
    return int(jax.random.randint(k, (), 0, np.iinfo(np.int32).max, dtype=jnp.int32))


def default_mesh(num_members: int) -> Mesh:
    """The mesh used when none is given: as few devices as give the least members per device.

    With ``D`` devices each holds ``ceil(members / D)`` members at best; using
    ``ceil(members / that)`` devices gets the same per-device load with the least padding
    (e.g. 10 members on 8 devices use 5 devices, 2 members each). Under ``jax.distributed``
    (several processes) the devices are this process's own (``jax.local_devices()``):
    training runs within a process (see :func:`make`).
    """
    local = jax.local_devices()
    per_device = -(-num_members // len(local))
    return make_mesh(devices=local[: -(-num_members // per_device)])


def _check_local_mesh(mesh: Mesh) -> None:
    """Training runs within one process: refuse a mesh holding other processes' devices
    (``init`` would fail in JAX's device_put, or the program wait for them forever)."""
    others = sorted({d.process_index for d in mesh.devices.flat} - {jax.process_index()})
    if others:
        raise ValueError(
            f"the mesh holds devices of other processes ({', '.join(map(str, others))}); an ensemble trains "
            f"within one process: pass mesh=jaxmem.make_mesh(devices=jax.local_devices()) (or mesh=None) to train "
            f"on this process's devices, then score with loglik_matrix_multihost across processes")


def _merged_state(state: Any) -> Any:
    """A stacked state as one ``nnx.State``: ``FitResult.state`` as it is; an
    :class:`EnsembleState`'s, or the pair ``(params, rest)``, merged."""
    if isinstance(state, EnsembleState):
        return nnx.merge_state(state.params, state.rest)
    if isinstance(state, (tuple, list)) and state and all(isinstance(s, nnx.State) for s in state):
        return nnx.merge_state(*state)
    return state


def member(graphdef: Any, state: Any, m: int) -> nnx.Module:
    """Member ``m`` as an ``nnx.Module`` from a stacked state (``FitResult.state``,
    ``(EnsembleState.params, EnsembleState.rest)`` or an :class:`EnsembleState`)."""
    state = _merged_state(state)
    members = jax.tree.leaves(state)[0].shape[0]
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 0 <= m < members:
        raise IndexError(f"member {m!r} does not exist: the state holds members 0..{members - 1}")
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[m], state))


def _as_keep(plan: Any) -> np.ndarray:
    keep = _check_keep(getattr(plan, "keep", plan))
    empty = np.flatnonzero(~keep.any(axis=1))
    if empty.size:
        raise ValueError(
            f"member(s) {empty[:10].tolist()} keep no training example; every member needs one"
        )
    return keep


def _check_data(data: Any, n: int) -> None:
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data must be an array or a pytree of arrays")
    for path, leaf in jax.tree_util.tree_leaves_with_path(data):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != n:
            raise ValueError(
                f"data leaf {jax.tree_util.keystr(path) or 'x'} has shape {np.shape(leaf)}; "
                f"axis 0 must be the {n} examples of the plan"
            )


def _check_finite(data: Any) -> None:
    """Refuse NaN or inf in floating data leaves (checked where the data lie, on device)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(data):
        bad = nonfinite_rows(leaf)
        if bad is not None and bad.size:
            raise ValueError(
                f"data leaf {jax.tree_util.keystr(path) or 'x'} has NaN or inf in {bad.size} example(s), "
                f"the first {bad[:5].tolist()}: training on them makes every member that keeps them NaN"
            )


def check_learning_rate(learning_rate: Any) -> float:
    """``learning_rate`` as a float, if it is a positive finite number; else a ValueError."""
    number = isinstance(learning_rate, (int, float, np.integer, np.floating))
    if not number or isinstance(learning_rate, (bool, np.bool_)):
        raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate!r}")
    value = float(learning_rate)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"learning_rate must be a positive finite number, got {value!r}")
    return value


@jax.jit
def _nonfinite_members(params: Any) -> jax.Array:
    """bool ``[members]``: whether any parameter of each member is NaN or inf."""
    flags = [~jnp.isfinite(a).reshape(a.shape[0], -1).all(axis=1)
             for a in jax.tree.leaves(params) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.stack(flags).any(axis=0) if flags else jnp.zeros((jax.tree.leaves(params)[0].shape[0],), bool)


def _graphdef_of(model: Any) -> Any:
    """The graphdef of ``model`` (an instance, or a factory traced without allocating)."""
    return nnx.split(_module_of(model), nnx.Param, ...)[0]


def _extra_args_taken(tx: Any) -> tuple[str, ...]:
    """Which of ``value``, ``grad`` and ``value_fn`` ``tx.update`` takes: all three for an
    ``optax.GradientTransformationExtraArgs`` whose update has ``**extra_args`` (optax's own:
    chains, reduce_on_plateau, lbfgs), those it names otherwise, none for a plain
    ``GradientTransformation`` (whose update takes none)."""
    names = ("value", "grad", "value_fn")
    if not isinstance(tx, optax.GradientTransformationExtraArgs):
        return ()
    try:
        parameters = inspect.signature(tx.update).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): optax's protocol
        return names
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return names
    return tuple(n for n in names if n in {p.name for p in parameters})


def _without_intermediates(module: nnx.Module, *, copy: bool) -> nnx.Module:
    """``module`` without values it sowed (``nnx.Intermediate``, e.g. from a call of its loss
    before training): outputs of a call, not state that steps carry (they are dropped after
    every step too). A copy of a user's instance, not the instance, when ``copy``."""
    if not nnx.state(module, nnx.Intermediate):
        return module
    if copy:
        module = nnx.clone(module)
    nnx.pop(module, nnx.Intermediate)
    return module


def _module_of(model: Any) -> nnx.Module:
    """``model`` itself (without sown values), or for a factory the abstract module it builds
    (shapes only)."""
    if isinstance(model, nnx.Module):
        return _without_intermediates(model, copy=True)
    if not callable(model):
        raise TypeError(
            "model must be an nnx.Module or a factory seed -> nnx.Module, "
            f"got {type(model).__name__}"
        )
    def build():
        module = model(0)
        if not isinstance(module, nnx.Module):
            raise TypeError(f"model factory returned {type(module).__name__}, not an nnx.Module")
        return _without_intermediates(module, copy=False)

    return nnx.eval_shape(build)  # shapes only: nothing is allocated


def _build_members(model: Any, num_members: int, seed: int):
    """(graphdef, stacked params, stacked rest, member 0's module) from a factory or a
    module instance."""
    if isinstance(model, nnx.Module):
        # One instance: every member starts from its parameters (a shared initialisation),
        # but draws its own random numbers: member m >= 1's PRNG keys (an nnx.Dropout's
        # rngs) are the instance's folded with m. Copied as they are, every member drew the
        # same dropout masks at every step. Member 0 keeps the instance's, so that one
        # member trains as the instance would alone.
        model = _without_intermediates(model, copy=True)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        stack = lambda s: jax.tree.map(lambda a: jnp.stack([a] * num_members), s)  # noqa: E731

        def own_keys(a):
            if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                return jnp.stack([a] * num_members)
            return jnp.stack([a] + [jax.random.fold_in(a, m) for m in range(1, num_members)])

        return graphdef, stack(params), jax.tree.map(own_keys, rest), model
    modules, parts = [], []
    for m in range(num_members):
        module = model(member_init_seed(seed, m))
        if not isinstance(module, nnx.Module):
            raise TypeError(f"model factory returned {type(module).__name__}, not an nnx.Module")
        module = _without_intermediates(module, copy=False)
        modules.append(module)
        parts.append(nnx.split(module, nnx.Param, ...))
    graphdef = parts[0][0]
    for m, (g, _, _) in enumerate(parts[1:], 1):
        if g != graphdef:
            raise ValueError(f"model factory built member {m} with another structure than member 0"
                             f"{_structure_difference(modules[0], modules[m], 'member 0', f'member {m}')}")
    stack = lambda i: jax.tree.map(lambda *a: jnp.stack(a), *(p[i] for p in parts))  # noqa: E731
    return graphdef, stack(1), stack(2), modules[0]


_NOT_STATIC = object()  # _static_value's answer for what JSON cannot hold


def _static_value(v: Any) -> Any:
    """A module attribute as JSON for the run configuration, or ``_NOT_STATIC``."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)  # strict JSON has no NaN / inf
    if isinstance(v, (tuple, list)) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v):
        return [_static_value(x) for x in v]
    if isinstance(v, (nnx.Module, nnx.Variable, jax.Array, np.ndarray)):
        return _NOT_STATIC
    if isinstance(v, np.dtype) or (isinstance(v, type) and hasattr(v, "dtype")):
        return str(np.dtype(v))
    if callable(v) and hasattr(v, "__qualname__"):  # an activation, a dot_general, ...
        return v.__qualname__  # not the module: private paths move between versions
    return _NOT_STATIC


def _static_attributes(module: nnx.Module) -> dict[str, Any]:
    """``{"path.name": value}``: the plain (non-Variable, non-submodule) attributes of every
    module of ``module``'s graph that JSON can hold: a dropout rate, a BatchNorm's momentum,
    layer sizes, activation functions (by name)."""
    out: dict[str, Any] = {}
    for path, node in nnx.iter_graph(module):
        if not isinstance(node, nnx.Module):
            continue
        prefix = "/".join(map(str, path))
        for name, value in vars(node).items():
            if name.startswith("_"):
                continue
            desc = _static_value(value)
            if desc is not _NOT_STATIC:
                out[f"{prefix}.{name}" if prefix else name] = desc
    return dict(sorted(out.items()))


def _structure_difference(a: nnx.Module, b: nnx.Module, name_a: str, name_b: str) -> str:
    """Why modules ``a`` and ``b`` split into different graphdefs, for an error message
    (starting with ': '): the first plain attribute (:func:`_static_attributes`) that differs."""
    hint = ("; plain Python attributes of the modules (anything not an nnx.Variable or a "
            "submodule) are part of the structure and must be equal in every member: keep "
            "per-member values such as a seed out of the module, or in an nnx.Variable")
    attrs_a, attrs_b = _static_attributes(a), _static_attributes(b)
    for key, value in attrs_a.items():
        if key in attrs_b and attrs_b[key] != value:
            return f": attribute {key!r} is {value!r} in {name_a} and {attrs_b[key]!r} in {name_b}{hint}"
    return hint  # other submodules, or attributes JSON cannot hold: no single value to name


#: Budget for one chunk of members' training state (parameters and optimizer state) on a
#: CPU (``member_chunk=None``). Vmapping members only pays on a CPU while each member's
#: products are too small to keep the cores busy; measured on a 2-core AMD EPYC (Adam,
#: K = 10, batch 64, ``benchmarks/RESULTS.md``), all 10 vmapped against one at a time:
#: 1.30x faster at 0.03 MB of state per member, 1.16x at 0.4 MB, 1.06x at 1.2 MB, but
#: 1.12x slower at 6.2 MB and 1.07x slower at 16 MB, and chunks of 4 of the paper's VAE
#: trained with SGD (13.7 MB each) 1.10x slower than one at a time.
CPU_CHUNK_BYTES = 4 * 2**20


class _PlanRows(NamedTuple):
    """What the programs of :func:`make` read of the plan, one row per member (axis 0 of
    size ``members``), computed on the host (see there)."""

    keep: Any  # bool [members, examples]
    train_count: Any  # int32 [members]: |train_m|
    heldout_idx: Any  # int32 [members, eval_chunks, eval_batch_size]: held-out examples first
    heldout_count: Any  # int32 [members]: examples held out


def _auto_chunk(member_rows: Any, mesh: Mesh) -> int:
    """Members per chunk when ``member_chunk`` is None (see :func:`make`)."""
    leaves = jax.tree.leaves(member_rows)
    local = leaves[0].shape[0]
    if not on_cpu(mesh):
        return local
    per_member = sum(math.prod(a.shape[1:]) * a.dtype.itemsize for a in leaves)
    return max(1, min(local, CPU_CHUNK_BYTES // max(per_member, 1)))


def make(
    model: nnx.Module | Callable[[int], nnx.Module],
    tx: optax.GradientTransformation,
    keep: Any,
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    eval_batch_size: int | None = None,
    unroll: int = 1,
    member_chunk: int | None = None,
    steps_per_epoch: int | None = None,
) -> Ensemble:
    """Pure training functions for every member of a membership plan.

    Compilation: each call of ``make`` builds new jitted functions, so their first calls
    compile again even for a configuration compiled before in the process (for a small
    model that is most of a short run's time). An :class:`Ensemble`'s ``epoch``, ``step``,
    ``schedule`` and ``evaluate`` are each compiled at their first call and reused for
    every later call with arguments of the same shapes, dtypes and placement: states of
    any seed (``init(seed)``), resumed or continued states, other data of the same
    shape. For a sweep over seeds, call ``make`` once and ``ens.init(seed)`` per seed.
    Called inside a caller's ``jax.jit`` or ``lax.scan``, they are compiled as part of
    the caller's program, with the plan a constant of it (the programs hold no sort or
    other costly computation of the plan alone, which XLA would fold at compile time).

    Args:
      model: a factory ``seed -> nnx.Module`` (members get independent initialisations,
        member ``m`` from :func:`member_init_seed`), or an ``nnx.Module`` (every member
        starts from its parameters). The module must have ``loss(batch, key) -> f32[B]``
        (nats per example, docs/CONTRACTS.md).
      tx: optax transformation, applied to each member separately. One that takes extra
        arguments (``optax.GradientTransformationExtraArgs``) gets those of ``value`` (the
        member's mean batch loss), ``grad`` and ``value_fn`` (that loss on the same batch,
        key and state) that its update accepts, as ``optax.contrib.reduce_on_plateau`` and
        ``optax.lbfgs`` need. The members'
        parameters are those the optimizer state holds: for optimizers whose evaluation
        parameters differ (``optax.contrib.schedule_free_*``), the held-out losses and any
        scores use the training ones unless you map them through
        ``optax.contrib.schedule_free_eval_params`` yourself.
      keep: bool ``[members, examples]``, or a plan with a ``.keep`` attribute.
      batch_size: examples per member per step.
      mesh: 1-D mesh for the member axis (default :func:`default_mesh`). If ``members``
        is not a multiple of its size, members are padded (repeats of member 0,
        computed and dropped) inside each call. Its devices must be this process's:
        under ``jax.distributed`` an ensemble trains within one process (every process
        that calls trains it; the default mesh is the process's own devices), and
        :func:`jaxmem.likelihood.loglik_matrix_multihost` then scores across processes.
      eval_batch_size: chunk size of the held-out evaluation (default ``batch_size``).
      unroll: steps per iteration of the scanned epoch loop (``lax.scan(unroll=...)``);
        more amortise the per-iteration loop overhead on accelerators, at the cost of
        compile time. Values are identical for any ``unroll``.
      member_chunk: how many members :attr:`Ensemble.epoch` trains side by side on a
        device. ``c``: the device's members are trained ``c`` at a time, vmapped within
        a chunk, chunk after chunk (``lax.map(batch_size=c)``), inside the same jitted
        epoch. ``None`` (default) picks by backend: on accelerators all of a device's
        members at once (one vmapped step, the fastest layout there); on a CPU as many
        as keep their parameters and optimizer state within :data:`CPU_CHUNK_BYTES`
        (at least one): small models gain from vmapping, while members of a few MB
        train fastest one at a time, each one's state staying in cache for its whole
        epoch instead of every member's streaming through memory at every step (the
        paper's MNIST VAE on a 2-core CPU: 1.13x to 1.44x faster per member-epoch than
        all vmapped, ``benchmarks/RESULTS.md``). Results agree across chunk sizes to
        float rounding (the matmuls are batched differently), not bitwise; a given chunk
        size is deterministic. ``step`` and ``evaluate`` always vmap all members.
      steps_per_epoch: optimizer steps of every member per epoch. ``None`` (default):
        ``ceil(max_m |train_m| / batch_size)``, enough for the largest member to see each
        of its examples once. A positive int sets it: a member with more than
        ``steps_per_epoch * batch_size`` training examples then trains each epoch on a
        fresh uniformly random subset of that many distinct examples of its own (the
        first slots of its permutation), and one with fewer reads its permutation
        cyclically as usual. E.g. a model trained on every example beside a plan's
        members, with the plan's own default, takes the members' number of steps.

    Returns:
      An :class:`Ensemble`.

    Examples:
      >>> ens = make(lambda s: MyVAE(rngs=nnx.Rngs(s)), optax.adam(1e-3), keep, batch_size=64)
      >>> state = ens.init(0)
      >>> for _ in range(10):
      ...     state, metrics = ens.epoch(state, x)   # x: f32[examples, ...] on device
    """
    keep = _as_keep(keep)
    num_members, n = keep.shape
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        hint = " (for Adam with that learning rate pass optax.adam(lr); fit() also takes a number)" \
            if isinstance(tx, (int, float)) else ""
        raise ValueError(f"tx must be an optax GradientTransformation, got {tx!r}{hint}")
    batch_size = _check_int("batch_size", batch_size, 1)
    if eval_batch_size is not None:
        eval_batch_size = _check_int("eval_batch_size", eval_batch_size, 1)
    unroll = _check_int("unroll", unroll, 1)
    if member_chunk is not None and (isinstance(member_chunk, bool) or int(member_chunk) != member_chunk
                                     or member_chunk < 1):
        raise ValueError(f"member_chunk must be None or a positive integer, got {member_chunk!r}")
    if steps_per_epoch is not None:
        steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, 1)
    eval_batch_size = eval_batch_size or batch_size
    mesh = default_mesh(num_members) if mesh is None else as_mesh(mesh)
    _check_local_mesh(mesh)
    axis = mesh.axis_names[0]
    train_sizes = keep.sum(axis=1)
    if batch_size > train_sizes.max():
        _warn.warn(
            f"batch_size={batch_size} exceeds the largest member's training set ({int(train_sizes.max())} "
            f"examples): each step's batch repeats examples, some more often than others; pass "
            f"batch_size <= {int(train_sizes.max())} for batches of distinct examples", UserWarning)
    steps = int(math.ceil(train_sizes.max() / batch_size)) if steps_per_epoch is None else steps_per_epoch
    max_out = int((~keep).sum(axis=1).max())
    eval_chunks = int(math.ceil(max_out / eval_batch_size))
    # What the programs need of the plan besides keep, computed here on the host: inside a
    # caller's jax.jit or lax.scan the plan is a constant of the caller's program, and XLA
    # would constant-fold a sort of it (seconds at n = 20,000, growing with n). Held-out
    # examples first (a stable argsort of the bool rows); the slots past a member's held-out
    # count hold training examples, weighted out.
    slots = np.minimum(np.arange(eval_chunks * eval_batch_size), n - 1)
    heldout_idx = np.argsort(keep, axis=1, kind="stable")[:, slots].astype(np.int32)
    plan_dev = jax.device_put(
        _PlanRows(keep, train_sizes.astype(np.int32),
                  heldout_idx.reshape(num_members, eval_chunks, eval_batch_size),
                  (~keep).sum(axis=1).astype(np.int32)),
        NamedSharding(mesh, P()),
    )
    plan_id = plan_fingerprint(keep)
    extra_args = _extra_args_taken(tx)
    module = _module_of(model)  # for a factory, abstract: shapes only
    graphdef, params1, rest1 = nnx.split(module, nnx.Param, ...)

    def member_loss(params, rest, batch, key, *, train=True):
        # copy=True: the module gets Variables of the current trace (the gradient's), which
        # BatchNorm and Dropout (their statistics, RNG counts) may then update.
        model_m = nnx.merge(graphdef, params, rest, copy=True)
        if not train:
            model_m.eval()  # deterministic=True, use_running_average=True
        losses = model_m.loss(batch, key)
        leading = jax.tree.leaves(batch)[0].shape[0]
        if not hasattr(losses, "dtype") or not jnp.issubdtype(losses.dtype, jnp.floating):
            got = getattr(losses, "dtype", type(losses).__name__)
            raise ValueError(f"model.loss must return floating-point per-example losses [B] (an integer loss "
                             f"has no gradient, so nothing would train), got {got}")
        if losses.shape != (leading,):
            raise ValueError(
                f"model.loss must return per-example losses of shape ({leading},), got {losses.shape}"
            )
        # Values a loss sows (nnx.Intermediate, e.g. logged activations) are dropped: they
        # are outputs of one call, not state that steps carry.
        _, _, _, new_rest = nnx.split(model_m, nnx.Param, nnx.Intermediate, ...)
        if jax.tree.structure(new_rest) != jax.tree.structure(rest):
            had = {_path_name(k) for k, _ in jax.tree_util.tree_leaves_with_path(rest)}
            new = [_path_name(k) for k, _ in jax.tree_util.tree_leaves_with_path(new_rest)]
            made = [k for k in new if k not in had] or ["(the state's structure changed)"]
            raise ValueError(
                f"model.loss created variables {made[:5]}: the state a step carries must keep the model's "
                "structure; create every variable in the model's __init__ (values sown as nnx.Intermediate "
                "are dropped)"
            )
        return losses, new_rest

    def member_step(params, rest, opt_state, key, batch, t):
        lkey = jax.random.fold_in(jax.random.fold_in(key, 1), t)

        def objective(p):
            with reverse_mode_dense():  # faster kernel gradients (see models._latent.dense)
                losses, new_rest = member_loss(p, rest, batch, lkey)
            return jnp.mean(losses), new_rest

        (loss, new_rest), grads = jax.value_and_grad(objective, has_aux=True)(params)
        # What optax's loss-aware transformations take (reduce_on_plateau: value; lbfgs:
        # value, grad and value_fn): this member's batch loss, and value_fn that loss on the
        # same batch, key and state (rest before this step's update of it), for those of
        # the three that tx.update accepts (optax.chain accepts all and passes them on).
        extra = {"value": loss, "grad": grads, "value_fn": lambda p: objective(p)[0]}
        updates, opt_state = tx.update(grads, opt_state, params, **{k: extra[k] for k in extra_args})
        params = optax.apply_updates(params, updates)
        return params, new_rest, opt_state, loss.astype(jnp.float32)

    def member_schedule(plan_m: _PlanRows, key, epoch):
        u = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, 0), epoch), (n,), jnp.float32)
        # Uniform keys lie in [0, 1): held-out examples (key 2) sort after every training one.
        order = jnp.argsort(jnp.where(plan_m.keep, u, 2.0))
        count = plan_m.train_count
        pos = jnp.arange(steps * batch_size, dtype=jnp.int32) % count
        return order[pos].reshape(steps, batch_size)

    def member_evaluate(params, rest, plan_m: _PlanRows, key, data):
        if eval_chunks == 0:  # no member holds anything out
            return jnp.float32(jnp.nan)
        count, idx = plan_m.heldout_count, plan_m.heldout_idx
        pos = jnp.arange(eval_chunks * eval_batch_size, dtype=jnp.int32)
        weight = (pos < count).astype(jnp.float32).reshape(eval_chunks, eval_batch_size)
        ekey = jax.random.fold_in(key, 2)

        def chunk(total, c):
            batch = jax.tree.map(lambda a: jnp.take(a, idx[c], axis=0), data)
            losses, _ = member_loss(params, rest, batch, jax.random.fold_in(ekey, c), train=False)
            # where(), not a product: a padded slot may hold a training example of any value.
            # Summed in float32 whatever the losses' dtype (float64 under x64).
            return total + jnp.sum(jnp.where(weight[c] > 0, losses.astype(jnp.float32), 0.0)), None

        total, _ = jax.lax.scan(chunk, jnp.float32(0.0), jnp.arange(eval_chunks))
        return total / count  # NaN when the member holds nothing out

    def member_epoch(params, rest, opt_state, key, plan_m, data, epoch, step0):
        idx = member_schedule(plan_m, key, epoch)

        def body(carry, s):
            params, rest, opt_state = carry
            batch = jax.tree.map(lambda a: jnp.take(a, idx[s], axis=0), data)
            params, rest, opt_state, loss = member_step(
                params, rest, opt_state, key, batch, step0 + s
            )
            return (params, rest, opt_state), loss

        (params, rest, opt_state), losses = jax.lax.scan(
            body, (params, rest, opt_state), jnp.arange(steps, dtype=jnp.int32), unroll=unroll
        )
        heldout = member_evaluate(params, rest, plan_m, key, data)
        return params, rest, opt_state, jnp.mean(losses), heldout

    def pick_chunk(member_rows, local: int) -> int:
        """Members of a device's ``local`` that ``epoch`` trains side by side."""
        return min(local, member_chunk or _auto_chunk(member_rows, mesh))

    def sharded(fn, rows, replicated):
        return shard_examples(fn, mesh, rows, replicated, axis_name=axis)

    # On CPUs, XLA options measured faster for these programs (jaxmem.mesh.CPU_COMPILER_OPTIONS);
    # under a caller's jit or scan, without them (jit_with_options).
    jit = functools.partial(jit_with_options, options=compiler_options(mesh, "training"))
    stack = lambda t: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct((num_members, *np.shape(a)), a.dtype), t)
    params_shapes = stack(params1)
    # The abstract (params, rest, opt_state) of this ensemble's state.
    expected = (params_shapes, stack(rest1), jax.eval_shape(jax.vmap(tx.init), params_shapes))

    def check_state(state: EnsembleState) -> None:
        """At trace time (free when compiled): ``state`` has this ensemble's members, model and
        optimizer state, not another ensemble's (which would train another model silently)."""
        got = (state.params, state.rest, state.opt_state)
        want_def, got_def = jax.tree.structure(expected), jax.tree.structure(got)
        if want_def != got_def:
            raise ValueError("state does not belong to this ensemble: its parameters or optimizer state have "
                             "another structure (another model or optimizer); use this ensemble's init() or a "
                             "checkpoint of it")
        for part, want_t, got_t in zip(("params", "rest", "opt_state"), expected, got):
            for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want_t), jax.tree.leaves(got_t)):
                if tuple(w.shape) != tuple(np.shape(g)) or w.dtype != g.dtype:
                    raise ValueError(
                        f"state does not belong to this ensemble: {part}{jax.tree_util.keystr(path)} is {g.dtype}"
                        f"{list(np.shape(g))}, this ensemble's is {w.dtype}{list(w.shape)} ({num_members} members)")
        check_plan(state)

    def check_plan(state: EnsembleState) -> None:
        """At trace time: ``state`` trains this plan's members (see EnsembleState.plan_id)."""
        got = getattr(state, "plan_id", None)
        if got == plan_id:
            return
        fix = ("use this ensemble's init() or a checkpoint of it; if the state's members really are this plan's "
               "members (e.g. rows of a larger ensemble whose plan has these rows), attach the plan with "
               "state._replace(plan_id=ensemble.plan_id)")
        if got is None:
            raise ValueError(f"state carries no plan_id (an EnsembleState built by hand?), so it cannot be told "
                             f"apart from a state of another membership plan: {fix}")
        raise ValueError(
            f"state belongs to an ensemble of another membership plan (plan_id {got}; this ensemble's is "
            f"{plan_id}): its members would train on examples this plan holds out from them; {fix}")

    @jit
    def epoch_fn(state: EnsembleState, data, plan: _PlanRows):
        check_state(state)

        def block(rows, rep):
            data, epoch, step0 = rep
            local = jax.tree.leaves(rows)[0].shape[0]
            chunk = pick_chunk(rows[:3], local)
            if chunk == local:
                return jax.vmap(member_epoch, in_axes=(0, 0, 0, 0, 0, None, None, None))(
                    *rows, data, epoch, step0
                )
            one = lambda r: member_epoch(*r, data, epoch, step0)  # noqa: E731
            return jax.lax.map(one, rows) if chunk == 1 else jax.lax.map(one, rows, batch_size=int(chunk))

        rows = (state.params, state.rest, state.opt_state, state.keys, plan)
        params, rest, opt_state, train, heldout = sharded(
            block, rows, (data, state.epoch, state.step)
        )
        new = EnsembleState(params, rest, opt_state, state.keys, state.epoch + 1, state.step + steps, plan_id)
        return new, {"train_loss": train, "heldout_loss": heldout}

    @jit
    def step_fn(state: EnsembleState, batch):
        check_state(state)

        def block(rows, t):
            params, rest, opt_state, keys, batch = rows
            return jax.vmap(member_step, in_axes=(0, 0, 0, 0, 0, None))(
                params, rest, opt_state, keys, batch, t
            )

        for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
            if leaf.ndim < 2 or leaf.shape[0] != num_members or leaf.shape[1] == 0:
                raise ValueError(
                    f"batch leaf {jax.tree_util.keystr(path) or 'x'} has shape {leaf.shape}; "
                    f"expected [members={num_members}, batch, ...]"
                )
        rows = (state.params, state.rest, state.opt_state, state.keys, batch)
        params, rest, opt_state, loss = sharded(block, rows, state.step)
        return state._replace(params=params, rest=rest, opt_state=opt_state, step=state.step + 1), loss

    @jax.jit
    def schedule_fn(state: EnsembleState, plan: _PlanRows):
        check_plan(state)
        return jax.vmap(member_schedule, in_axes=(0, 0, None))(plan, state.keys, state.epoch)

    @jit
    def evaluate_fn(state: EnsembleState, data, plan: _PlanRows):
        check_state(state)

        def block(rows, data):
            params, rest, keys, plan_rows = rows
            return jax.vmap(member_evaluate, in_axes=(0, 0, 0, 0, None))(
                params, rest, plan_rows, keys, data
            )

        # Not keep: the held-out evaluation needs only its indices and counts.
        plan = plan._replace(keep=None, train_count=None)
        return sharded(block, (state.params, state.rest, state.keys, plan), data)

    # Weak references to the leaves of the data last checked: held strongly, the ensemble (and
    # a FitResult holding it) would keep a copy of the data set on the device for as long as
    # it lives. A reference that died no longer matches, so an id reused by new data is checked.
    checked: list[weakref.ref] = []

    def check(data):
        """Shapes every call; values (NaN, a jaxmem model's range and dtype) once per data
        object: a user's loop passes the same array every epoch, and one scan suffices."""
        _check_data(data, n)
        leaves = jax.tree.leaves(data)
        if any(isinstance(a, jax.core.Tracer) for a in leaves):
            return data  # under the caller's jit: values cannot be looked at
        if not (len(checked) == len(leaves) and all(r() is a for r, a in zip(checked, leaves))):
            _check_finite(data)
            _models.check_model_data(module, data)
            try:
                checked[:] = [weakref.ref(a) for a in leaves]
            except TypeError:  # a leaf type without weak references: checked again next call
                checked.clear()
        return data

    def chunk_of(state: EnsembleState) -> int:
        local = -(-num_members // mesh.size)  # members per device, padded as shard_examples does
        return pick_chunk((state.params, state.rest, state.opt_state), local)

    def init(seed: int) -> EnsembleState:
        seed = _check_key_seed(seed)
        built, params, rest, first = _build_members(model, num_members, seed)
        if built != graphdef:
            raise ValueError("the model factory built a model with another structure at init than "
                             "model(0) at make" + _structure_difference(module, first, "model(0)", "member 0"))
        opt_state = jax.vmap(tx.init)(params)
        keys = jax.vmap(lambda m: jax.random.fold_in(seed_key(seed), m))(
            jnp.arange(num_members)
        )
        # Members split over the mesh when they divide evenly; otherwise replicated, and
        # shard_examples pads them inside each call. Counters replicated: every array of
        # the state lives on the mesh, so restored checkpoints land in the same place.
        rows = NamedSharding(mesh, P(axis) if num_members % mesh.size == 0 else P())
        put = lambda t: jax.device_put(t, rows)  # noqa: E731
        counter = jax.device_put(jnp.int32(0), NamedSharding(mesh, P()))
        state = EnsembleState(put(params), put(rest), put(opt_state), put(keys), counter, counter, plan_id)
        return state

    return Ensemble(
        graphdef=graphdef,
        init=init,
        step=step_fn,
        epoch=lambda state, data: epoch_fn(state, check(data), plan_dev),
        schedule=lambda state: schedule_fn(state, plan_dev),
        evaluate=lambda state, data: evaluate_fn(state, check(data), plan_dev),
        keep=keep,
        steps_per_epoch=steps,
        batch_size=batch_size,
        mesh=mesh,
        member_chunk=chunk_of,
        check_data=check,
        plan_id=plan_id,
    )


def _run_config(ens: Ensemble, model: Any, tx_config: Any, data: Any, state: EnsembleState,
                *, seed: int, epochs: int, user: Any) -> dict[str, Any]:
    """What a run directory must agree on before a checkpoint of it may be resumed."""
    from jaxmem.checkpoint import describe_tree, fingerprint_array

    abstract = _module_of(model)
    member0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), state.params)
    opt0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), state.opt_state)
    leaves = jax.tree.leaves(data)
    return {
        "members": int(ens.keep.shape[0]),
        "examples": int(ens.keep.shape[1]),
        "plan_sha256": fingerprint_array(ens.keep),
        "data": {
            "example_shapes": [f"{np.dtype(a.dtype)}{list(np.shape(a)[1:])}" for a in leaves],
            "sha256": [fingerprint_array(np.asarray(a)) for a in leaves],
        },
        "model": {
            "class": f"{type(abstract).__module__}.{type(abstract).__qualname__}",
            "config": getattr(abstract, "config", None),
            "params": describe_tree(member0),
            # A model without a config (a user's own module): its plain attributes, so that
            # a run resumed with another dropout rate or momentum is refused, not mixed.
            **({} if getattr(abstract, "config", None) is not None else {"static": _static_attributes(abstract)}),
        },
        "optimizer": {"config": tx_config, "state": describe_tree(opt0)},
        "batch_size": ens.batch_size,
        "steps_per_epoch": ens.steps_per_epoch,
        "seed": int(seed),
        "epochs": int(epochs),
        # Training's float rounding depends on how many devices the members are split over.
        # Compared only where recorded (run directories written before it resume).
        "devices": int(ens.mesh.size),
        "user": user,
        # Under x64, float arithmetic outside jaxmem's control (optax's bias corrections,
        # float64 data) rounds otherwise: a run is resumed under the setting it began with.
        # Recorded only when on, so that run directories written before stay resumable.
        **({"jax_enable_x64": True} if jax.config.jax_enable_x64 else {}),
    }


def _devices_hint(stored: Any, also: str = "") -> str:
    """How to resume a run directory trained on ``stored`` devices (its ``"devices"``);
    ``also``: another way to pass them, after the mesh (e.g. the CLI's option)."""
    text = f"the devices training ran on: pass mesh=jaxmem.make_mesh({stored}){also}"
    if isinstance(stored, int) and stored > len(jax.devices()):
        text += f"; make_mesh({stored}) needs {stored} devices and {_more_devices_advice(stored)}"
    return text


def _history_problem(restored: Any, names: Any, epochs: int, members: int) -> str | None:
    """What is wrong with a checkpoint's history of ``epochs`` epochs (None if nothing):
    every metric needs one row of ``members`` numbers per epoch."""
    if not isinstance(restored, dict):
        return f"its history is a {type(restored).__name__}, not a dict of metrics"
    for k in names:
        rows = restored.get(k)
        if not isinstance(rows, list) or len(rows) != epochs:
            got = f"{len(rows)} rows" if isinstance(rows, list) else "no rows" if rows is None else type(rows).__name__
            return f"its history holds {got} of {k} for the {epochs} epoch(s) it was saved at (one row per epoch)"
        bad = [i for i, row in enumerate(rows) if not isinstance(row, list) or len(row) != members
               or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)]
        if bad:
            return f"its history's {k} row {bad[0]} does not hold one number per member ({members})"
    return None


def fit(
    model: nnx.Module | Callable[[int], nnx.Module],
    tx: optax.GradientTransformation | float,
    data: Any,
    keep: Any,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    run_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    keep_checkpoints: int = 3,
    progress: bool = True,
    mesh: Mesh | None = None,
    callback: Callable[[int, EnsembleState, dict[str, np.ndarray]], None] | None = None,
    config: Any = None,
    eval_batch_size: int | None = None,
    steps_per_epoch: int | None = None,
) -> FitResult:
    """Train every member of a plan, with progress, logging, checkpoints and resumption.

    Each call builds its ensemble with :func:`make`, so it compiles the epoch program
    again, also for a configuration compiled before in the process: continuing a
    ``run_dir`` to more epochs, or another ``seed``. For the digits MLP VAE (hidden
    [256, 128]) on 400 examples, 4 members, that is 8.5 s of a 10 s call on a 2-core CPU.
    For a sweep over seeds, build the ensemble once with :func:`make` and loop over
    ``ens.init(seed)`` and ``ens.epoch`` (compiled once for all seeds).

    Args:
      model: factory ``seed -> nnx.Module`` or a module (see :func:`make`).
      tx: an optax transformation, or a learning rate for ``optax.adam``.
      data: array or pytree of arrays, axis 0 the examples ``[examples, ...]``; placed
        on the device(s) once, replicated.
      keep: bool ``[members, examples]`` or a plan with ``.keep``.
      epochs: total epochs (a resumed run continues up to it).
      batch_size: examples per member per step.
      seed: initialisation, batch order and loss randomness (see the module docstring).
      run_dir: if given, checkpoints go there every ``checkpoint_every`` epochs (and
        after the last); if it already holds a checkpoint of the same configuration,
        training resumes from the latest one. Another configuration raises
        :class:`jaxmem.checkpoint.ConfigMismatchError` if the directory holds a
        checkpoint (one with none, a run stopped before its first, is replaced). The
        configuration includes the number of devices of the mesh (a resume on another
        is refused, naming the mesh to pass; run directories written before it was
        recorded are not checked) and ``jax_enable_x64``; it records the software
        versions and device kind (:func:`jaxmem.checkpoint.provenance`), not compared: a
        resume under other jax, jaxlib, flax or optax versions warns.
      checkpoint_every: epochs between checkpoints.
      keep_checkpoints: newest checkpoints kept.
      progress: show a tqdm bar counting member-epochs.
      mesh: mesh for the member axis (default :func:`default_mesh`).
      callback: ``callback(epoch, state, metrics)`` after each epoch trained in this call
        (``epoch`` = epochs completed; metrics as numpy ``[members]``), e.g. to score
        members at several epochs. Not replayed for epochs restored from a checkpoint.
      config: extra JSON-serialisable configuration (e.g. model and optimizer settings)
        stored in the run directory and required to match on resume. With ``tx`` an optax
        transformation, only its state's structure is recorded, not its hyperparameters
        (an ``optax.adam(100.0)`` resumes a run of ``optax.adam(1e-3)``): record them
        here. A learning rate given as ``tx`` is recorded.
      eval_batch_size: chunk size of the held-out evaluation.
      steps_per_epoch: optimizer steps per epoch (see :func:`make`; default
        ``ceil(max_m |train_m| / batch_size)``). Recorded in ``run_dir``: a run is resumed
        only with the same number.

    Returns:
      A :class:`FitResult`; ``history`` holds per-member train and held-out losses (nats
      per example) of every epoch.

    Raises:
      ValueError: data whose axis 0 is not the plan's examples, or with NaN or inf; for
        jaxmem's models, data out of their range (:func:`jaxmem.models.check_model_data`).
      TrainingDivergedError: a member's training loss or parameters became non-finite
        (checked after every epoch, before its checkpoint is written).
      ConfigMismatchError: ``run_dir`` holds a run of another configuration (e.g.
        trained on another number of devices, or under another ``jax_enable_x64``).
      CheckpointDamagedError: the checkpoint to resume from cannot be read (it names the
        earlier checkpoint kept, which deleting the damaged one resumes from).
    """
    epochs = _check_int("epochs", epochs, 0)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
    keep_checkpoints = _check_int("keep_checkpoints", keep_checkpoints, 1)
    seed = _check_key_seed(seed)
    if isinstance(tx, (int, float, np.integer, np.floating)) and not isinstance(tx, (bool, np.bool_)):
        learning_rate = check_learning_rate(tx)
        tx_config: Any = {"name": "adam", "learning_rate": learning_rate}
        tx = optax.adam(learning_rate)
    elif callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None)):
        tx_config = None
    else:
        raise ValueError(f"tx must be an optax GradientTransformation or a learning rate for optax.adam, got {tx!r}")
    keep = _as_keep(keep)
    num_members = keep.shape[0]
    _check_data(data, keep.shape[1])
    ens = make(model, tx, keep, batch_size=batch_size, mesh=mesh, eval_batch_size=eval_batch_size,
               steps_per_epoch=steps_per_epoch)
    state = ens.init(seed)
    # Placed before the configuration is taken: its fingerprint is of the data as trained on
    # (e.g. float64 input becomes float32 without x64).
    data = jax.device_put(data, NamedSharding(ens.mesh, P()))
    # NaN or inf (on the devices, where the data now lie) and, for jaxmem's models, value
    # ranges: refused before anything is written; epochs on this data do not check again.
    data = ens.check_data(data)
    history: dict[str, list] = {"train_loss": [], "heldout_loss": []}

    ckpt = None
    if run_dir is not None:
        from jaxmem.checkpoint import RunCheckpoints, _path

        run_dir = _path(run_dir)  # "~/run" (also in messages): not a folder named "~" here

        cfg = _run_config(ens, model, tx_config, data, state, seed=seed, epochs=epochs, user=config)
        ckpt = RunCheckpoints(run_dir, cfg, max_to_keep=keep_checkpoints, mutable=("epochs",),
                              added_later=("devices",), hints={"devices": _devices_hint})
        try:
            latest = ckpt.latest_epoch()
            if latest is not None and latest > epochs:
                from jaxmem.checkpoint import ConfigMismatchError, incomplete_note

                raise ConfigMismatchError(
                    f"{run_dir} holds a checkpoint of epoch {latest}, past the {epochs} epoch(s) "
                    f"asked for; ask for at least {latest} epochs, or use another run directory"
                    + incomplete_note(run_dir, latest)
                )
            if latest is not None:
                state, restored = ckpt.restore(state, latest)
                problem = _history_problem(restored, history, latest, num_members)
                if problem:  # e.g. a hand-edited or partly copied history: it would misnumber the epochs
                    raise ckpt._damaged(latest, ValueError(problem))
                history = {k: [list(map(float, row)) for row in restored[k]] for k in history}
                log.info("resumed %s from epoch %d", run_dir, latest)
        except BaseException:
            # A refused or damaged checkpoint, or Ctrl-C: release orbax's threads and the
            # directory (its lock), keep the files.
            ckpt.close()
            raise

    start = int(state.epoch)
    saved = start if ckpt is not None and start > 0 else None  # the last checkpointed epoch
    bar = None
    try:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=num_members * max(epochs, start), initial=num_members * start,
                disable=not progress, unit="member-epoch", desc="ensemble",
            )
        except ImportError:  # tqdm is a dependency; keep training without it anyway
            pass
        for e in range(start, epochs):
            state, metrics = ens.epoch(state, data)
            metrics = {k: np.asarray(v) for k, v in metrics.items()}
            # Before the checkpoint: the run directory keeps finite states only. The loss
            # is of the parameters before each step, so the parameters themselves are
            # checked too (an update can make them non-finite with a finite loss).
            bad_loss = ~np.isfinite(metrics["train_loss"])
            bad_params = np.asarray(_nonfinite_members(state.params))[:num_members]
            diverged = np.flatnonzero(bad_loss | bad_params)
            if diverged.size:
                kept = (f"; {run_dir} keeps the checkpoint of epoch {saved}" if saved is not None
                        else f"; {run_dir} holds no checkpoint yet" if ckpt is not None else "")
                what = []
                if bad_loss.any():
                    bad = metrics["train_loss"][bad_loss]
                    losses = ", ".join([f"{v:g}" for v in bad[:3]] + ["..."] * (bad.size > 3))
                    what.append(f"a non-finite training loss ({losses})")
                if bad_params.any():
                    what.append("non-finite parameters")
                members = _index_list(diverged)
                raise TrainingDivergedError(
                    f"training diverged in epoch {e + 1}: member(s) [{members}] of "
                    f"{num_members} have {' and '.join(what)}; lower the learning rate{kept}"
                )
            for k in history:
                history[k].append(metrics[k].astype(float).tolist())
            done = e + 1
            log.info(
                "epoch %d: train loss per member %s; held-out loss per member %s (nats)",
                done, np.array2string(metrics["train_loss"], precision=3),
                np.array2string(metrics["heldout_loss"], precision=3),
            )
            if bar is not None:
                bar.update(num_members)
                bar.set_postfix(
                    train=f"{np.nanmean(metrics['train_loss']):.4g}",
                    heldout=f"{np.nanmean(metrics['heldout_loss']):.4g}"
                    if np.isfinite(metrics["heldout_loss"]).any() else "-",
                )
            if ckpt is not None and (done % checkpoint_every == 0 or done == epochs):
                ckpt.save(done, state, history)
                saved = done
            if callback is not None:
                callback(done, state, metrics)
    finally:
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()

    full = _merged_state(state)
    hist = {k: np.asarray(v, dtype=np.float32).reshape(-1, num_members) for k, v in history.items()}
    return FitResult(ens.graphdef, full, state, hist, ens)
