"""The log-likelihood matrix: every ensemble member's log p of every example, one kernel.

``ll[m, i]`` is member m's estimate of log p(x_i) in nats — the importance-weighted
bound (Burda et al., 2016) for VAEs, the ELBO on request, the exact log p(y|x) for
classifiers — computed by ONE jitted program that

- vmaps over members on accelerators (their states stacked on axis 0,
  docs/CONTRACTS.md), and loops over them (``lax.map``) on CPUs,
- loops (``lax.map``) over blocks of ``example_chunk`` examples and, inside, (``lax.scan``)
  over blocks of ``sample_chunk`` importance samples, keeping a running log-sum-exp, so
  that memory is ``O(models * example_chunk * sample_chunk * width)`` whatever n and S are
  (without the ``models`` factor on CPUs), while every matmul is
  ``[example_chunk * sample_chunk, width]``-sized,
- is sharded over examples with :func:`jaxmem.mesh.shard_examples`,
- is compiled once for many n: the rows go in at most 20 calls of one shape (with or
  without a progress bar), a block holds ``example_chunk`` examples per device, or for
  fewer the next power of two (at most twice the work), and S counts only where
  something is sampled (not for ``kind="exact"``/``"correct"`` nor jaxmem's classifier),
- is compiled with XLA's default options on every platform. (Until the twelfth session
  it was compiled on CPUs with XLA's Eigen matmuls instead of YNNPACK's; on two CPU
  devices of one process that program returned wrong values for about 5% of the pairs
  of the paper's VAE, see ``jaxmem.mesh.CPU_COMPILER_OPTIONS``.)

Reproducibility: example i's randomness (binarisation / dequantisation, and each
importance sample) comes from ``fold_in(key, i)`` with i its *global* index, and
sample s from ``fold_in(fold_in(fold_in(key, i), 1), s)`` (see
:mod:`jaxmem.models._latent`). So ``ll`` does not depend on the number of devices or
processes, on ``example_chunk`` or on ``sample_chunk``, except for float32 rounding
(different block shapes sum in different orders, ~1e-6 relative); and ``ll[m, i]``
equals ``model_m.log_prob(x_i, fold_in(key, i), S)`` called directly, with the model in
evaluation mode (``model.eval()``: Dropout off, BatchNorm on its running statistics),
which the kernel sets whatever mode the graphdef holds. Nor does it depend on
``jax_enable_x64``: every random number is drawn in float32 either way.

Multi-host: :func:`loglik_matrix_multihost` runs the same kernel after
``jax.distributed.initialize`` with each process feeding only its own rows; the
processes first check, in one small exchange, that they agree on the arguments and the
state and that none refused its input.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmem import mesh as _mesh, models as _models
from jaxmem.checkpoint import _is_key
from jaxmem.ensemble import _merged_state
from jaxmem.membership import _check_int
from jaxmem.models import _latent
from jaxmem.models._latent import LatentVariableModel
from jaxmem.scores import _refuse_rbg_data, _require_threefry

__all__ = ["KINDS", "loglik_matrix", "loglik_matrix_multihost"]

#: What ``kind=`` can ask for.
KINDS = ("iw", "elbo", "correct", "exact")

# The kinds that are one model method, and that method (the classifier's, the oracle's).
_METHOD_OF_KIND = {"correct": "correct", "exact": "exact_log_prob"}


def _per_example(values, method: str, c: int):
    """A user model's ``method`` output as f32 ``[c]``: refused at trace time, naming the
    method, unless it holds one value per example (``[c]``; ``[c, 1]`` is taken as that)."""
    shape = tuple(np.shape(values))
    if shape not in ((c,), (c, 1)):
        raise ValueError(f"model.{method} must return one value per example, shape ({c},) for a batch of {c} "
                         f"(docs/CONTRACTS.md), got {shape}" + (" (a sum over the example's dimensions missing?)"
                                                                if len(shape) > 1 and shape[0] == c else ""))
    return jnp.reshape(values, (c,)).astype(jnp.float32)


def _member_values(graphdef, state, batch, keys, *, kind, num_samples, sample_chunk):
    """One member's values, f32 ``[c]``, on one block of ``c`` examples."""
    model = nnx.merge(graphdef, state)
    # Evaluation mode (Dropout off, BatchNorm on its running statistics), whatever mode
    # the graphdef holds (NNX modules start in training mode): in training mode an
    # example's value would depend on the others of its block, so on example_chunk.
    model.eval()
    if kind in _METHOD_OF_KIND:
        name = _METHOD_OF_KIND[kind]
        if not hasattr(model, name):
            raise ValueError(f"kind={kind!r} needs a model with .{name}(), and {type(model).__name__} has none")
        return _per_example(getattr(model, name)(batch), name, keys.shape[0])
    if not isinstance(model, LatentVariableModel):
        # Not a jaxmem VAE: the model's own method, all S samples in one call (a
        # classifier's log_prob is the exact log p(y|x)).
        if kind == "elbo":
            if not hasattr(model, "elbo"):
                raise ValueError(f"kind='elbo' needs a model with .elbo(batch, keys, num_samples) "
                                 f"(docs/CONTRACTS.md), and {type(model).__name__} has none")
            return _per_example(model.elbo(batch, keys, num_samples), "elbo", keys.shape[0])
        return _per_example(model.log_prob(batch, keys, num_samples), "log_prob", keys.shape[0])

    x, q = model.prepare(batch, keys)
    sc = min(sample_chunk, num_samples)
    n_chunks = -(-num_samples // sc)
    ragged = num_samples % sc != 0

    def body(acc, j):
        ids = j * sc + jnp.arange(sc)
        lw = model.log_weights(x, q, keys, ids)  # [c, sc]
        # each chunk's sum in the model's dtype, the running total in float32 (the output's)
        if kind == "iw":
            if ragged:  # samples past S in the last chunk do not count
                lw = jnp.where(ids < num_samples, lw, -jnp.inf)
            return jnp.logaddexp(acc, jax.nn.logsumexp(lw, axis=-1).astype(acc.dtype)), None
        if ragged:
            lw = jnp.where(ids < num_samples, lw, 0.0)
        return acc + jnp.sum(lw, axis=-1).astype(acc.dtype), None

    c = keys.shape[0]
    init = jnp.full((c,), -jnp.inf, jnp.float32) if kind == "iw" else jnp.zeros((c,), jnp.float32)
    acc, _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    return acc - math.log(num_samples) if kind == "iw" else acc / num_samples


def _kernel_impl(graphdef, state, data, idx, key_data, *, mesh, kind, num_samples, example_chunk,
                 sample_chunk, key_impl, loop_members=None, matmul_dtype="float32"):
    """``[models, rows]`` for ``rows`` a multiple of ``devices * example_chunk``."""
    # loop_members=None: loop over members on CPUs, where one member's [example_chunk *
    # sample_chunk, width] activations already fill the cores and vmapping all of them
    # multiplies every layer's working set by their number (10 members of the paper's VAE:
    # 80 MiB per activation instead of 8) and batches every matmul; vmap on accelerators,
    # which it fills. Values agree to float32 rounding either way.
    members_in_turn = _mesh.on_cpu(mesh) if loop_members is None else bool(loop_members)

    def local(block, replicated):
        data_b, idx_b = block
        state_r, key_data_r = replicated
        key = jax.random.wrap_key_data(key_data_r, impl=key_impl)
        rows = idx_b.shape[0]
        c = example_chunk
        blocks = jax.tree.map(lambda a: a.reshape(rows // c, c, *a.shape[1:]), (data_b, idx_b))

        def one_block(args):
            batch, ids = args
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
            member = functools.partial(
                _member_values, graphdef, batch=batch, keys=keys, kind=kind,
                num_samples=num_samples, sample_chunk=sample_chunk,
            )
            if members_in_turn:  # one member's activations at a time
                return jax.lax.map(member, state_r)  # [models, c]
            return jax.vmap(member)(state_r)  # [models, c]

        out = jax.lax.map(one_block, blocks)  # [rows / c, models, c]
        return jnp.moveaxis(out, 0, 1).reshape(out.shape[1], rows)

    with _latent.matmul_dtype(matmul_dtype):  # the models' layers read it while `local` is traced
        return _mesh.shard_examples(local, mesh, (data, idx), (state, key_data), example_axis=1)


_STATIC = ("graphdef", "mesh", "kind", "num_samples", "example_chunk", "sample_chunk", "key_impl",
           "loop_members", "matmul_dtype")
_kernel = jax.jit(_kernel_impl, static_argnames=_STATIC)


def _stack_models(models):
    """(graphdef, stacked state) of a sequence of nnx.Modules of one structure."""
    if not models:
        raise ValueError("the list of models is empty")
    not_modules = [i for i, m in enumerate(models) if not isinstance(m, nnx.Module)]
    if not_modules:
        i = not_modules[0]
        raise ValueError(f"models[{i}] is a {type(models[i]).__name__}, not an nnx.Module")
    splits = [nnx.split(m) for m in models]
    graphdef, first = splits[0]
    shapes = jax.tree.map(np.shape, first)
    for i, (g, s) in enumerate(splits[1:], 1):
        if g != graphdef or jax.tree.map(np.shape, s) != shapes:
            raise ValueError(f"models[{i}] differs from models[0] in structure (layers, sizes, hyperparameters "
                             "or parameter shapes): the members of one ensemble share one architecture")
    return graphdef, jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *[s for _, s in splits])


def _split_model(graphdef_or_model, state):
    """(graphdef, stacked state, models); a lone nnx.Module becomes a 1-member ensemble,
    a list or tuple of them an ensemble of their stacked states."""
    state = _merged_state(state)
    if isinstance(graphdef_or_model, nnx.Module):
        if state is not None:
            raise ValueError("pass either a model, or (graphdef, stacked_state), not a model and a state")
        graphdef, single = nnx.split(graphdef_or_model)
        return graphdef, jax.tree.map(lambda a: jnp.asarray(a)[None], single), 1
    if isinstance(graphdef_or_model, (list, tuple)):
        if state is not None:
            raise ValueError("pass either a list of models, or (graphdef, stacked_state), not models and a state")
        graphdef, stacked = _stack_models(graphdef_or_model)
        return graphdef, stacked, len(graphdef_or_model)
    if state is None:
        raise ValueError(f"got a {type(graphdef_or_model).__name__} and no stacked state: pass an nnx.Module, "
                         "a list of them, or a graphdef and its stacked state (members on axis 0)")
    leaves = jax.tree.leaves(state)
    if not leaves:
        raise ValueError("the state has no arrays")
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "stacked_state must have the members on axis 0 of every leaf (got leading sizes "
            f"{sorted(map(str, sizes))}); pass a single model as an nnx.Module instead"
        )
    return graphdef_or_model, state, sizes.pop()


def _loop_members(value):
    """``loop_members`` checked: None or a bool (numpy's included), as a Python bool."""
    if value is None:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"loop_members must be None, True or False, got {value!r}")
    return bool(value)


def _member_class_and_options(graphdef, stacked_state):
    """Member 0 as an abstract module (shapes only, nothing computed): its class and options."""
    return nnx.merge(graphdef, jax.eval_shape(lambda s: jax.tree.map(lambda a: a[0], s), stacked_state))


def _check_inputs(data, kind, num_samples, example_chunk, sample_chunk, member):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for name, v in [("num_samples", num_samples), ("example_chunk", example_chunk),
                    ("sample_chunk", sample_chunk)]:
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data has no arrays")
    n = np.shape(leaves[0])[0] if np.ndim(leaves[0]) else 0
    for a in leaves:
        if not np.ndim(a) or np.shape(a)[0] != n:
            raise ValueError(f"every data array needs the same number of rows, got {[np.shape(a) for a in leaves]}")
    for a in leaves:
        bad = _mesh.nonfinite_rows(a)  # None under jit: cannot look
        if bad is not None and bad.size:
            raise ValueError(f"data has non-finite values in example(s) {bad[:10].tolist()}")
    # Value ranges (pixels in [0, 1], classifier labels): out of range, jaxmem's models give
    # silently wrong log-likelihoods (e.g. 8-bit pixels all binarise to 1).
    _models.check_model_data(member, data)
    return n


def _samples_drawn(member, kind, num_samples):
    """S as the kernel takes it (its static ``num_samples``): 1 where nothing is sampled,
    so that S neither shrinks the default ``example_chunk`` nor compiles a program of its
    own for the same values: ``kind="exact"`` or ``"correct"``, and a jaxmem
    :class:`~jaxmem.models.Classifier` (its ``log_prob`` and ``elbo`` are the exact
    log p(y|x), S unused) unless a subclass overrides them. Otherwise ``num_samples``
    as given (a user's own module may sample in its ``log_prob``; an invalid value is
    left for :func:`_check_inputs` to report)."""
    if kind in _METHOD_OF_KIND:
        return 1
    if kind in ("iw", "elbo") and all(getattr(type(member), name, None) is getattr(_models.Classifier, name)
                                      for name in ("log_prob", "elbo")):
        return 1
    return num_samples


#: Default target of ``example_chunk * min(S, sample_chunk)``: rows of each matmul.
ROWS_PER_BLOCK = 2048


def _default_chunk(example_chunk, num_samples, sample_chunk):
    if example_chunk is not None:
        return example_chunk
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        return 1  # _check_inputs reports it
    return int(min(1024, max(16, ROWS_PER_BLOCK // min(num_samples, max(1, sample_chunk)))))


def _block_examples(example_chunk, per_device):
    """Examples per block for ``per_device`` (>= 1) examples per device: ``example_chunk``,
    or, for fewer, the next power of two at or above ``per_device``. Every n below the
    chunk then compiles one of at most ``log2(example_chunk) + 1`` programs (not one per
    n), for at most twice the work of that block. Values as with any other chunk, to
    float32 rounding (each example's randomness comes from its own index; padding rows
    are dropped)."""
    return min(example_chunk, 1 << (per_device - 1).bit_length())


#: At most this many calls of the kernel per :func:`loglik_matrix`, all of one compiled
#: program (``rows`` a multiple of ``devices * chunk``): the progress bar's steps.
_CALLS = 20


def _units_per_call(units: int) -> int:
    """Blocks per call for ``units`` blocks of examples: of the splits into at most
    ``_CALLS`` calls of at most ``ceil(units / (_CALLS / 2))`` blocks, the one that pads the
    last call least (469 blocks: 10 calls of 47, one block padded, where 20 calls of 24
    padded 11: 2.3% more work). Up to ``_CALLS`` blocks: calls of one block."""
    lo = -(-units // _CALLS)
    hi = max(lo, -(-units // (_CALLS // 2)))
    return min(range(lo, hi + 1), key=lambda u: (-(-units // u) * u - units, u))


def _key_parts(key):
    """``(key data, "threefry2x32")`` of one base key: a typed threefry key or raw
    ``uint32[2]`` data; a batch of keys or another implementation is refused."""
    if _is_key(jnp.asarray(key)):
        key = jnp.asarray(key)
        if key.shape != ():
            raise ValueError(
                f"key must be one PRNG key (jax.random.key(seed)), got a batch of keys of shape {key.shape}: "
                "every example's randomness is derived from the one base key (fold_in with its index)")
        _require_threefry(key, "loglik_matrix")
        return jax.random.key_data(key), str(jax.random.key_impl(key))
    key = jnp.asarray(key)
    _refuse_rbg_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"key must be a PRNG key (jax.random.key(seed)), got {key.dtype}{key.shape}")
    return key, "threefry2x32"


def _pad_to(tree, rows):
    n = jax.tree.leaves(tree)[0].shape[0]
    if n == rows:
        return tree
    return jax.tree.map(lambda a: np.concatenate([a, np.broadcast_to(a[:1], (rows - n, *a.shape[1:]))]), tree)


def _as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def loglik_matrix(
    graphdef: Any,
    stacked_state: Any = None,
    data: Any = None,
    *,
    key: jax.Array,
    num_samples: int = 1,
    kind: str = "iw",
    mesh: jax.sharding.Mesh | None = None,
    example_chunk: int | None = None,
    sample_chunk: int = 128,
    progress: bool = False,
    loop_members: bool | None = None,
    matmul_dtype: Any = None,
) -> jax.Array:
    r"""Log-likelihood of every example under every ensemble member, ``[models, examples]``.

    For VAEs (``kind="iw"``) the importance-weighted estimate with S samples,

    .. math:: \mathrm{ll}[m, i] = \log \frac{1}{S} \sum_{s=1}^{S}
              \frac{p_m(x_i, z_s)}{q_m(z_s \mid x_i)}, \quad z_s \sim q_m(z \mid x_i),

    a stochastic lower bound of log p_m(x_i) that tightens as S grows.

    Every member is scored in evaluation mode: the kernel calls ``model.eval()`` on it
    (``deterministic=True``, ``use_running_average=True``: Dropout off, BatchNorm on its
    running statistics) whatever mode the graphdef or module holds. NNX modules start
    in training mode, where a BatchNorm would normalise each example with the
    statistics of the others of its block, so that ``ll`` would change with
    ``example_chunk``. The modules passed in are left as they are.

    Args:
      graphdef: the ensemble's graphdef (``nnx.split``); or a single ``nnx.Module``
        (then ``stacked_state`` is omitted and the result has one row); or a list of
        ``nnx.Module`` of one architecture, e.g. separately trained models (then
        ``stacked_state`` is omitted and row m is ``models[m]``).
      stacked_state: the members' states stacked on axis 0: one ``nnx.State``
        (``FitResult.state``), the pair ``(EnsembleState.params, EnsembleState.rest)``
        (as :func:`jaxmem.ensemble.member` takes), or an
        :class:`~jaxmem.ensemble.EnsembleState` itself; the three give the same numbers.
      data: the batch pytree of all n examples (docs/CONTRACTS.md): ``x [n, ...]``, or
        ``(x, y)`` for classifiers.
      key: base PRNG key; example i uses ``fold_in(key, i)``.
      num_samples: S, importance samples per (member, example). Taken as 1 (the same
        values, and the same compiled program, whatever S) where nothing is sampled:
        ``kind="exact"`` or ``"correct"``, and a :class:`~jaxmem.models.Classifier`'s
        exact log p(y|x). A user's own module gets S as given.
      kind: ``"iw"`` (importance-weighted log p(x); a classifier's exact log p(y|x)),
        ``"elbo"`` (the mean of the same S log-weights, so ``iw >= elbo`` example by
        example), ``"correct"`` (classifiers: 1.0 where the prediction is right) or
        ``"exact"`` (models with ``exact_log_prob``, e.g. the linear-Gaussian VAE).
        A model that is not a :class:`~jaxmem.models.LatentVariableModel` (the
        classifier, a user's own module) is scored by its own ``log_prob(batch, keys,
        S)`` (``"iw"``) or ``elbo(batch, keys, S)`` (``"elbo"``; a ValueError if it has
        none), all S samples in one call: ``sample_chunk`` does not apply to it.
      mesh: 1-D device mesh to shard examples over (default: all devices).
      example_chunk: examples per block (per device); with sample_chunk it bounds the
        memory, ``O(models * example_chunk * min(S, sample_chunk) * width)``. Default:
        ``ROWS_PER_BLOCK // min(S, sample_chunk)`` (in [16, 1024]), so every matmul has
        ~2048 rows per member (measured fastest on CPU for the paper's MNIST VAE). With
        fewer examples per device, a block holds the next power of two at or above
        their number (so n below the chunk shares a few compiled programs).
      sample_chunk: importance samples per block. Neither chunk size changes the values
        beyond float32 rounding.
      progress: show a progress bar. The work is split into at most 20 calls of one
        compiled program with or without it (the bar counts them), so both give the same
        numbers, bit for bit, from one compile.
      loop_members: ``True``: score one member after another (``lax.map``); ``False``:
        all members at once (``vmap``). ``None`` (default): loop on CPUs, where it keeps
        one member's activations in cache and was measured faster, vmap on accelerators.
        Values agree to float32 rounding either way.
      matmul_dtype: ``None`` or ``"float32"`` (default): the layers multiply in float32
        (on GPUs/TPUs at JAX's default matmul precision). ``"bfloat16"``: the dense
        layers (:class:`~jaxmem.models.MLPVAE`'s and :class:`~jaxmem.models.Classifier`'s
        all, :class:`~jaxmem.models.ConvVAE`'s dense ones, not its convolutions)
        multiply bf16-rounded inputs and kernels with float32 accumulation
        (:func:`jaxmem.models._latent.matmul_dtype`); everything else stays float32.
        Opt-in, for speed where the hardware multiplies bf16 natively: on a 2-core
        Sapphire Rapids CPU (AMX units) the paper's MNIST VAE scored 2.8-3.1x more pairs
        per second; on 2-core AMD EPYCs (Zen 3, AVX2, no bf16 instructions) 0.65-0.77x,
        slower, and on such CPUs it warns (``jaxmem.models._latent.cpu_multiplies_bf16``).
        It changes the values, by the rounding alone (the importance samples are the
        same): for the paper's VAE trained on 32x32 digits, S = 256, log p moved by
        0.03 nats RMS (at most 0.27, at log p ~ -367) and M by 0.04 RMS, about 1/50 of
        the Monte Carlo spread of the S-sample estimate itself across keys (``benchmarks/RESULTS.md``,
        ``matmul_dtype.py``; ``tests/test_likelihood.py`` bounds both).

    Returns:
      f32 ``[models, examples]``, nats per example (0/1 for ``kind="correct"``), whatever
      ``jax_enable_x64`` says. With x64 on and float64 data (or float64 parameters) the
      models compute in float64, and each block of ``sample_chunk`` samples is rounded
      to float32 when it is added to the running total; float32 models and data give
      the same program, and the same numbers, with x64 on or off.

    Examples:
      >>> ll = loglik_matrix(graphdef, state, x, key=jax.random.key(0), num_samples=256)
    """
    graphdef, stacked_state, num_models = _split_model(graphdef, stacked_state)
    loop_members = _loop_members(loop_members)
    matmul_dtype = _latent.check_matmul_dtype(matmul_dtype)
    _latent.warn_if_bf16_is_slow(matmul_dtype)
    member = _member_class_and_options(graphdef, stacked_state)
    samples = _samples_drawn(member, kind, num_samples)
    example_chunk = _default_chunk(example_chunk, samples, sample_chunk)
    n = _check_inputs(data, kind, num_samples, example_chunk, sample_chunk, member)
    if jax.process_count() > 1:
        raise ValueError("with several processes, use loglik_matrix_multihost (each process feeds its rows)")
    if n == 0:
        return jnp.zeros((num_models, 0), jnp.float32)
    mesh = _mesh.as_mesh(mesh)
    # Every device scores its examples under every member: place the states replicated on
    # this mesh, wherever training left them (e.g. members split over other devices).
    stacked_state = _mesh.replicate(stacked_state, mesh)
    ndev = mesh.devices.size
    key_data, key_impl = _key_parts(key)
    chunk = _block_examples(example_chunk, -(-n // ndev))  # do not pad a small n up to a large chunk
    unit = ndev * chunk
    # Rows per call, a multiple of unit, the same with or without progress, so that both
    # run one compiled program, as does every n up to _CALLS * unit.
    rows = unit * _units_per_call(-(-n // unit))
    data = _as_numpy(data)
    call = functools.partial(
        _kernel, graphdef, stacked_state, key_data=key_data, mesh=mesh, kind=kind,
        num_samples=int(samples), example_chunk=chunk, sample_chunk=int(sample_chunk),
        key_impl=key_impl, loop_members=loop_members, matmul_dtype=matmul_dtype,
    )
    starts = range(0, n, rows)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="log-likelihood", unit="block")
    outs = []
    for s in starts:
        e = min(n, s + rows)
        block = _pad_to(jax.tree.map(lambda a: a[s:e], data), rows)
        idx = _pad_to(np.arange(s, e, dtype=np.int32), rows)
        outs.append(call(data=block, idx=idx)[:, : e - s])
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _host_leaf(a: Any) -> np.ndarray:
    """A state leaf as a numpy array on the host; a PRNG key leaf as its key data."""
    if _is_key(a):
        a = jax.random.key_data(a)
    return np.asarray(a)


def _crc(*parts: Any) -> int:
    """CRC-32 of strings and numpy arrays' bytes (a fingerprint, the same in every process)."""
    h = 0
    for p in parts:
        h = zlib.crc32(np.ascontiguousarray(p).data if isinstance(p, np.ndarray) else str(p).encode(), h)
    return h


# What the processes of loglik_matrix_multihost must agree on, and how a value is shown
# (None: a fingerprint, shown as "not as in process 0").
_SHOWN_AS = {
    "num_examples": str,
    "num_samples": str,
    "kind": lambda v: repr(KINDS[v]),
    "example_chunk": lambda v: "None" if v < 0 else str(v),
    "sample_chunk": str,
    "loop_members": lambda v: repr((None, False, True)[v + 1]),
    "matmul_dtype": lambda v: repr(_latent.MATMUL_DTYPES[v]),
    "key": None,
    "stacked_state (paths, shapes, dtypes)": None,
    "stacked_state (values)": None,
    "local_data (structure, row shapes, dtypes)": None,
}
_MESSAGE_BYTES = 2000


def _processes(ids: Any) -> str:
    """``"process 1"``, ``"processes 1, 3"``."""
    ids = [int(p) for p in ids]
    return f"process {ids[0]}" if len(ids) == 1 else "processes " + ", ".join(map(str, ids))


def _agree_across_processes(fields: dict[str, int] | None, error: Exception | None) -> None:
    """One exchange among all processes (``process_allgather`` of a small record) before
    the kernel: a ValueError in EVERY process when one of them refused its input
    (``error``; the process and its message named) or when they disagree on ``fields``
    (the field named, with each process's value where it is shown)."""
    from jax.experimental import multihost_utils

    values = np.zeros(len(_SHOWN_AS), np.int64)
    if fields is not None:
        values[:] = [fields[name] for name in _SHOWN_AS]
    message = b"" if error is None else f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
    record = np.concatenate([np.frombuffer(np.uint8(error is not None).tobytes(), np.uint8), values.view(np.uint8),
                             np.frombuffer(message.ljust(_MESSAGE_BYTES, b"\0"), np.uint8)])
    every = np.asarray(multihost_utils.process_allgather(record))  # [processes, record]
    failed = np.flatnonzero(every[:, 0])
    if failed.size:
        said = [every[p, 1 + values.nbytes:].tobytes().rstrip(b"\0").decode(errors="replace") for p in failed]
        text = "; ".join(f"process {p}: {m}" for p, m in zip(failed, said))
        raise ValueError(f"loglik_matrix_multihost refused the input of {_processes(failed)} (so every process "
                         f"stops here): {text}") from error
    table = np.ascontiguousarray(every[:, 1:1 + values.nbytes]).view(np.int64)  # [processes, fields]
    differ = []
    for j, (name, show) in enumerate(_SHOWN_AS.items()):
        column = table[:, j]
        if (column == column[0]).all():
            continue
        if show is None:
            differ.append(f"{name} ({_processes(np.flatnonzero(column != column[0]))}: not as in process 0)")
        else:
            differ.append(f"{name} (" + ", ".join(f"process {p}: {show(int(v))}" for p, v in enumerate(column)) + ")")
    if differ:
        raise ValueError(
            "loglik_matrix_multihost: the processes passed different " + "; ".join(differ) + ". Every process must "
            "pass the same arguments and the same stacked_state (load one checkpoint in all of them, or send process "
            "0's with jax.experimental.multihost_utils.broadcast_one_to_all), each with its own rows of the same data")


def loglik_matrix_multihost(
    graphdef: Any,
    stacked_state: Any = None,
    local_data: Any = None,
    *,
    num_examples: int,
    key: jax.Array,
    num_samples: int = 1,
    kind: str = "iw",
    example_chunk: int | None = None,
    sample_chunk: int = 128,
    loop_members: bool | None = None,
    matmul_dtype: Any = None,
) -> np.ndarray:
    """:func:`loglik_matrix` across processes: each feeds its own rows, all get the whole matrix.

    Call in every process after :func:`jaxmem.mesh.initialize_distributed`. Process p
    passes the rows ``jaxmem.mesh.host_local_rows(num_examples)`` (a contiguous block)
    of the data; the kernel runs sharded over the devices of all processes, and the
    result is gathered once (``process_allgather``). Values equal the single-process
    ones to float32 rounding, since each example's randomness depends only on its
    global index.

    Before the kernel, the processes exchange one small record each (one
    ``process_allgather``): whether this process's input passed the checks, and its
    arguments: ``num_examples``, ``num_samples``, ``kind``, ``example_chunk``,
    ``sample_chunk``, ``loop_members``, ``matmul_dtype``, fingerprints (CRC-32) of ``key``,
    of ``stacked_state``'s leaves (paths, shapes, dtypes, and the bytes of their values)
    and of ``local_data``'s structure, row shapes and dtypes. A process whose input is
    refused, or any disagreement, raises the same ValueError in every process, so that
    none waits in the kernel for a process that is not coming. (``graphdef`` is not
    compared: the state's leaf paths and shapes stand for it.) The state is copied to
    the host for this once, as it is anyway to place it on the global mesh.

    Args:
      graphdef, stacked_state: as for :func:`loglik_matrix` (identical in every process:
        compared). PRNG key leaves (an ``nnx.Dropout``'s ``rngs``) are placed with
        their key data and implementation.
      local_data: this process's rows of the data pytree, ``x[host_local_rows(n)]``.
        Only their number is checked, not which rows they are: the right number of
        other rows gives a matrix of the wrong examples.
      num_examples: n, the total number of examples over all processes, an integer
        >= 0 (0 gives an empty ``[models, 0]`` matrix, as :func:`loglik_matrix` does).
      key, num_samples, kind, example_chunk, sample_chunk, loop_members, matmul_dtype: as
        for :func:`loglik_matrix`.

    Returns:
      numpy f32 ``[models, num_examples]`` (nats), the same in every process.

    Raises:
      ValueError: in every process, when in any process ``num_examples`` is not an
        integer >= 0, ``local_data`` has another number of rows than that process's
        share (the process, its range and count named), or an option or the data is
        refused as by :func:`loglik_matrix` (the process and its message named); or
        when the processes disagree on an argument or on ``stacked_state`` (named,
        with each process's value where it is a number or a name). With one process,
        the check's own error (ValueError) as it is.
    """
    from jax.experimental import multihost_utils

    nproc, ndev_local = jax.process_count(), jax.local_device_count()
    fields = error = None
    try:  # local checks first; every process then hears of any process's refusal
        num_examples = _check_int("num_examples", num_examples)
        graphdef, stacked_state, num_models = _split_model(graphdef, stacked_state)
        loop_members = _loop_members(loop_members)
        matmul_dtype = _latent.check_matmul_dtype(matmul_dtype)
        _latent.warn_if_bf16_is_slow(matmul_dtype)
        chunk_asked = example_chunk
        member = _member_class_and_options(graphdef, stacked_state)
        samples = _samples_drawn(member, kind, num_samples)
        example_chunk = _default_chunk(example_chunk, samples, sample_chunk)
        local_idx = _mesh.host_local_rows(num_examples).astype(np.int32)
        n_local = _check_inputs(local_data, kind, num_samples, example_chunk, sample_chunk, member)
        if n_local != local_idx.size:
            raise ValueError(
                f"process {jax.process_index()} must feed rows {local_idx[:1].tolist()}..{local_idx[-1:].tolist()} "
                f"({local_idx.size} rows of {num_examples}, jaxmem.mesh.host_local_rows), got {n_local}"
            )
        key_data, key_impl = _key_parts(key)
        # The state goes to the host once: fingerprinted here, fed to the kernel below.
        host_state = jax.tree.map(_host_leaf, stacked_state)
        if nproc > 1:
            state_layout = [(jax.tree_util.keystr(path), np.shape(a), jnp.result_type(a))
                            for path, a in jax.tree_util.tree_leaves_with_path(stacked_state)]
            fields = {
                "num_examples": num_examples, "num_samples": int(num_samples), "kind": KINDS.index(kind),
                "example_chunk": -1 if chunk_asked is None else int(chunk_asked), "sample_chunk": int(sample_chunk),
                "loop_members": -1 if loop_members is None else int(loop_members),
                "matmul_dtype": _latent.MATMUL_DTYPES.index(matmul_dtype),
                "key": _crc(key_impl, np.asarray(key_data)),
                "stacked_state (paths, shapes, dtypes)": _crc(state_layout),
                "stacked_state (values)": _crc(*jax.tree.leaves(host_state)),
                "local_data (structure, row shapes, dtypes)": _crc(
                    jax.tree.structure(local_data), [(np.shape(a)[1:], jnp.result_type(a))
                                                     for a in jax.tree.leaves(local_data)]),
            }
    except Exception as e:  # noqa: BLE001 - whatever it is, the other processes must not wait for this one
        if nproc == 1:
            raise
        error = e
    if nproc > 1:
        _agree_across_processes(fields, error)
    if num_examples == 0:  # every process returns here (they agree on it): no collective is left waiting
        return np.zeros((num_models, 0), np.float32)
    mesh = _mesh.make_mesh()  # devices of all processes, process by process
    block = -(-num_examples // nproc)  # rows per process before padding
    chunk = _block_examples(example_chunk, -(-block // ndev_local))
    rows = ndev_local * chunk * -(-block // (ndev_local * chunk))  # per process, padded
    if n_local == 0:  # more processes than examples: feed padding only (dropped below)
        local_data = jax.tree.map(lambda a: np.zeros((1, *np.shape(a)[1:]), np.asarray(a).dtype), local_data)
        local_idx = np.zeros((1,), np.int32)
    data = _pad_to(_as_numpy(local_data), rows)
    idx = _pad_to(local_idx, rows)
    sharded = NamedSharding(mesh, P(_mesh.AXIS))
    replicated = NamedSharding(mesh, P())

    def global_rows(a):
        return jax.make_array_from_process_local_data(sharded, a, (rows * nproc, *a.shape[1:]))

    def global_replicated(leaf, host):
        a = jax.make_array_from_process_local_data(replicated, host, host.shape)
        if _is_key(leaf):  # e.g. an nnx.Dropout's key
            return jax.random.wrap_key_data(a, impl=jax.random.key_impl(leaf))
        return a

    out = _kernel(
        graphdef, jax.tree.map(global_replicated, stacked_state, host_state), jax.tree.map(global_rows, data),
        global_rows(idx), global_replicated(key_data, np.asarray(key_data)), mesh=mesh, kind=kind,
        num_samples=int(samples), example_chunk=chunk, sample_chunk=int(sample_chunk),
        key_impl=key_impl, loop_members=loop_members, matmul_dtype=matmul_dtype,
    )
    full = np.asarray(multihost_utils.process_allgather(out, tiled=True))  # [models, rows * nproc]
    keep = np.concatenate([p * rows + np.arange(min(block, max(0, num_examples - p * block)))
                           for p in range(nproc)])
    return full[:, keep]
