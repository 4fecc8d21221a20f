"""Memorization scores from a log-likelihood matrix and a membership mask.

Inputs are ``ll[models, examples]`` (per-model log-likelihoods of each example, nats)
and ``keep[models, examples]`` (True where the model trained on the example), whether
they came from jaxmem's ensemble or from a user's cached model outputs.

* :func:`memorization_scores` -- the leave-one-out density ratio of van den Burg &
  Williams (2021), with per-example uncertainty and "highly memorized" flags.
* :func:`feldman_zhang` -- Feldman & Zhang's (2020) label memorization from per-model
  correctness or ``log p(y | x)``.
* :func:`quantile_flags` -- the examples above a quantile of a score.

Each function validates its inputs on the host (non-finite values, shapes, coverage),
then runs one jitted program in which the per-example work is sharded over a device
mesh with :func:`jaxmem.mesh.shard_examples`; results agree between 1 and 8 devices
to float rounding. Computation is in ``ll``'s floating dtype (float32 unless x64 is
enabled and ``ll`` is float64).

Multi-host (``jax.distributed``): with ``mesh=None`` each function runs on the devices
of the process that calls it (:func:`jaxmem.mesh.as_mesh`), so one process alone (e.g.
process 0 writing the results) may score the numpy matrix that
:func:`jaxmem.likelihood.loglik_matrix_multihost` returns in every process. A global
mesh (``mesh=jaxmem.make_mesh()``) shards the examples over all processes' devices;
then every process must make the call, and the results are global arrays
(``jax.experimental.multihost_utils.process_allgather`` collects them).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxmem.checkpoint import _is_key
from jaxmem.membership import Plan
from jaxmem.mesh import as_mesh, shard_examples

__all__ = [
    "Scores",
    "LabelMemorization",
    "memorization_scores",
    "feldman_zhang",
    "quantile_flags",
]

# How many offending (model, example) pairs an error message lists.
_SHOW = 10
_UNCERTAINTY = ("jackknife", "bootstrap")


class Scores(NamedTuple):
    """Per-example memorization scores (all arrays ``[examples]``, log terms in nats).

    Attributes:
      U: ``logmeanexp`` of ``ll`` over the models that trained on the example.
      V: ``logmeanexp`` of ``ll`` over the models that held it out.
      M: the memorization score ``U - V`` (computed from max-shifted sums, so it keeps
        its precision even when ``U`` and ``V`` are large, e.g. around -1e5).
      stderr: standard error of ``M`` (jackknife or bootstrap over models, see
        :func:`memorization_scores`); NaN where a side has a single model (a spread
        cannot be estimated from one value).
      dof: Welch-Satterthwaite degrees of freedom of ``stderr`` (for t intervals).
      n_in: int32, number of "in" models behind ``U``.
      n_out: int32, number of "out" models behind ``V``.
      highly_memorized: bool, ``M`` above its requested quantile over all examples,
        decided by rank (:func:`quantile_flags`): ``M > threshold`` but for a threshold
        that rounds onto a score.
      threshold: scalar, the requested quantile of ``M`` over all examples.
    """

    U: jax.Array
    V: jax.Array
    M: jax.Array
    stderr: jax.Array
    dof: jax.Array
    n_in: jax.Array
    n_out: jax.Array
    highly_memorized: jax.Array
    threshold: jax.Array

    def interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Two-sided Student-t confidence interval for ``M`` at ``level``.

        ``M +- t_{dof}((1 + level) / 2) * stderr``. With the paper's 10 out-models the
        t quantile matters: on log-normal synthetic data (see
        :func:`memorization_scores`) a normal (1.96) jackknife interval covered 91.3%,
        the t interval 93.9%.

        Returns:
          ``(lower, upper)``, float64 numpy ``[examples]``, nats.
        """
        from scipy import stats  # scipy ships with scikit-learn, a jaxmem dependency

        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        q = stats.t.ppf(0.5 + level / 2, np.asarray(self.dof, dtype=np.float64))
        half = q * np.asarray(self.stderr, dtype=np.float64)
        m = np.asarray(self.M, dtype=np.float64)
        return m - half, m + half


class LabelMemorization(NamedTuple):
    """Feldman & Zhang label memorization per example (arrays ``[examples]``).

    Attributes:
      mem: ``mean_in - mean_out`` (accuracy difference, or nats for log-probs).
      mean_in: mean over the "in" models of correctness (or of ``log p(y|x)``).
      mean_out: the same over the "out" models.
      stderr: Welch standard error ``sqrt(s_in^2 / n_in + s_out^2 / n_out)`` with
        sample variances (ddof = 1); NaN where a side has a single model.
      n_in: int32 number of "in" models.
      n_out: int32 number of "out" models.
    """

    mem: jax.Array
    mean_in: jax.Array
    mean_out: jax.Array
    stderr: jax.Array
    n_in: jax.Array
    n_out: jax.Array


# --------------------------------------------------------------------- validation
def _describe_pairs(pairs: np.ndarray, values: np.ndarray) -> str:
    shown = ", ".join(
        f"(model {int(m)}, example {int(i)})={v}" for (m, i), v in zip(pairs[:_SHOW], values)
    )
    more = ", ..." if len(pairs) > _SHOW else ""
    noun = "entry" if len(pairs) == 1 else "entries"
    return f"{len(pairs)} {noun} (model, example): {shown}{more}"


def _check_values(values: Any, name: str, kinds: str = "a floating array (nats)") -> jax.Array | np.ndarray:
    """2-D, finite; checked before anything else so a NaN never becomes a NaN score.

    ``kinds`` says what the error for another dtype asks for."""
    if not hasattr(values, "shape") or not hasattr(values, "dtype"):
        values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"{name} must be 2-D [models, examples], got shape {values.shape}")
    if jnp.issubdtype(values.dtype, jnp.bool_):
        return values
    if not jnp.issubdtype(values.dtype, jnp.floating):
        raise TypeError(f"{name} must be {kinds}, got dtype {values.dtype}")
    bad = _bad_pairs(values, lambda v, xp: ~xp.isfinite(v))
    if bad:
        raise ValueError(f"{name} has NaN or inf at {bad}")
    return values


def _bad_pairs(values, is_bad) -> str | None:
    """Describe the (model, example) pairs where ``is_bad(values, xp)``, or None if none.

    Reduced where ``values`` live first (``xp`` is jnp or np), so a large device array
    is copied to the host only when something is wrong with it.
    """
    xp = jnp if isinstance(values, jax.Array) else np
    if not bool(xp.any(is_bad(values, xp))):
        return None
    host = np.asarray(values)
    pairs = np.argwhere(is_bad(host, np))
    return _describe_pairs(pairs, host[tuple(pairs[:_SHOW].T)])


def _as_plan(keep: Any, shape: tuple[int, int], name: str) -> Plan:
    plan = keep if isinstance(keep, Plan) else Plan.from_keep(keep)
    if plan.keep.shape != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(shape)} but keep has shape {plan.keep.shape} "
            "(both must be [models, examples])"
        )
    return plan.validate()


def _float_dtype(values) -> jnp.dtype:
    # Half precision cannot hold log-likelihoods of -1e5 to useful accuracy.
    dtype = jnp.dtype(values.dtype)
    if dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(jax.dtypes.canonicalize_dtype(dtype))


def _resolve_mesh(mesh: Mesh | None) -> Mesh:
    return as_mesh(mesh)


def _check_quantile(quantile: float) -> float:
    """``quantile`` as a float in [0, 1]: a real number (a 0-d real array too), not a bool or a string."""
    q = quantile
    if hasattr(q, "ndim") and hasattr(q, "dtype") and q.ndim == 0 and q.dtype != np.bool_ and (
        jnp.issubdtype(q.dtype, jnp.integer) or jnp.issubdtype(q.dtype, jnp.floating)
    ):
        q = q.item()
    if isinstance(q, (bool, np.bool_)) or not isinstance(q, numbers.Real) or not 0.0 <= float(q) <= 1.0:
        raise ValueError(f"quantile must be a real number in [0, 1], got {quantile!r}")
    return float(q)


def _check_num_bootstrap(num_bootstrap: Any, uncertainty: str) -> int:
    """A whole number of replicates: >= 2 for the bootstrap, >= 1 (unused) otherwise."""
    minimum, why = (2, " with uncertainty='bootstrap'") if uncertainty == "bootstrap" else (1, "")
    value = num_bootstrap
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    ok = ok and bool(np.isfinite(value)) and int(value) == value and int(value) >= minimum
    if not ok:
        raise ValueError(f"num_bootstrap must be an integer, at least {minimum}{why} (bootstrap replicates), "
                         f"got {num_bootstrap!r}")
    return int(value)


def _require_threefry(key: jax.Array, who: str) -> None:
    """Refuse a typed key of another implementation than threefry2x32 (``rbg``,
    ``unsafe_rbg``): their ``fold_in`` and ``split`` streams under ``vmap`` depend on the
    batch they are drawn with, so values would change with the chunking and the mesh."""
    impl = str(jax.random.key_impl(key))
    if impl != "threefry2x32":
        raise ValueError(
            f"key must be a threefry2x32 key, got a {impl} key: {who} derives every example's "
            f"randomness from it with fold_in, and {impl} streams drawn under vmap depend on how "
            "examples are blocked over calls and devices, so the values would change with the chunk "
            "size and the mesh. Pass jax.random.key(seed, impl='threefry2x32')"
        )


def _refuse_rbg_data(key: jax.Array) -> None:
    """Refuse ``uint32[4]``, the raw data of an rbg key (``jax.random.PRNGKey`` under
    ``jax_default_prng_impl='rbg'``), naming it (see :func:`_require_threefry`)."""
    if key.dtype == jnp.uint32 and key.shape == (4,):
        raise ValueError(
            "key must be a threefry2x32 key; got uint32[4], the raw data of an rbg key (jax.random.PRNGKey "
            "under jax_default_prng_impl='rbg'), whose streams depend on the blocking: pass "
            "jax.random.key(seed, impl='threefry2x32')")


def _check_key(key: Any) -> jax.Array:
    """A single threefry2x32 PRNG key (``jax.random.key(seed)``, or raw key data ``uint32[2]``
    as ``jax.random.PRNGKey(seed)`` gives by default); None gives ``key(0)`` (threefry)."""
    if key is None:
        return jax.random.key(0, impl="threefry2x32")
    if isinstance(key, jax.Array):
        if _is_key(key) and key.shape == ():
            _require_threefry(key, "the bootstrap")
            return key
        if key.dtype == jnp.uint32 and key.shape == (2,):  # threefry key data
            return jax.random.wrap_key_data(key, impl="threefry2x32")
        _refuse_rbg_data(key)
    what = f"{type(key).__name__} {key.dtype}{list(key.shape)}" if hasattr(key, "dtype") else repr(key)[:60]
    raise ValueError(f"key must be one PRNG key, jax.random.key(seed), or None (jax.random.key(0)); got {what}")


# ---------------------------------------------------------------------- kernels
def _logmeanexp_side(x: jax.Array, w: jax.Array):
    """Max-shifted log-mean-exp of ``x`` over the columns where ``w``, per row.

    Returns ``(m, s, n, e, total)`` with ``logmeanexp = m + s``: ``m`` the row max (over
    ``w``), ``s = log(total) - log(n)`` small, ``n`` the count, ``e = exp(x - m)`` ``[B,
    models]`` (0 off the mask) and ``total`` its row sum, which the jackknife and the
    bootstrap reuse. Keeping ``m`` apart lets callers form differences of large
    log-likelihoods without rounding them first.
    """
    n = jnp.sum(w, axis=1)
    xm = jnp.where(w, x, -jnp.inf)
    m = jnp.max(xm, axis=1)
    e = jnp.exp(xm - m[:, None])  # 0 off the mask, 1 at the max
    total = jnp.sum(e, axis=1)
    s = jnp.log(total) - jnp.log(n.astype(x.dtype))
    return m, s, n, e, total


def _jackknife_var(x: jax.Array, w: jax.Array, m, n, e, total):
    """Jackknife variance of the log-mean-exp over the masked columns, per row.

    Leave-one-out sums are ``total - e_j``, exact to 2 ulps because the max term (= 1)
    stays in them; leaving out the max itself is recomputed around the second-largest
    value instead, so no sum ever cancels catastrophically. All values are relative
    to ``m`` so that deviations of ~1e-3 nats survive ll of -1e5 in float32.
    """
    dtype = x.dtype
    xm = jnp.where(w, x, -jnp.inf)
    top = jax.nn.one_hot(jnp.argmax(xm, axis=1), x.shape[1], dtype=jnp.bool_)
    rest = w & ~top
    two = n >= 2
    m2 = jnp.where(two, jnp.max(jnp.where(rest, x, -jnp.inf), axis=1), m)
    total2 = jnp.sum(jnp.exp(jnp.where(rest, x - m2[:, None], -jnp.inf)), axis=1)
    log_nm1 = jnp.log(jnp.maximum(n - 1, 1).astype(dtype))
    loo_top = (m2 - m) + jnp.log(total2) - log_nm1  # leave out the max: [B]
    loo_rest = jnp.log(jnp.maximum(total[:, None] - e, 0)) - log_nm1[:, None]  # [B, M]
    theta = jnp.where(top, loo_top[:, None], loo_rest)
    theta = jnp.where(w, theta, 0)
    nf = n.astype(dtype)
    theta_bar = jnp.sum(theta, axis=1) / nf
    dev = jnp.where(w, theta - theta_bar[:, None], 0)
    var = (nf - 1) / nf * jnp.sum(dev * dev, axis=1)
    return jnp.where(two, var, jnp.nan)


def _bootstrap_var(x, w, m, n, total, keys, num_bootstrap):
    """Bootstrap variances of the in- and out-side log-mean-exps, per row.

    ``m``, ``n``, ``total`` are ``(in, out)`` pairs from :func:`_logmeanexp_side`.
    Each replicate draws, per row, ``n_in`` of the row's in-models and ``n_out`` of its
    out-models with replacement, from the row's own key (derived from the example
    index), so results do not depend on how examples are split over devices.
    Replicates are looped, not stacked, to keep memory at O(rows * models).

    The PRNG is most of the cost, so it is spent sparingly: with the in-models sorted
    first, slot ``t < n_in`` of a row draws an in-model and slot ``t >= n_in`` an
    out-model (``n_in + n_out = models`` slots in all), and each draw uses 16 random
    bits, ``index = (r * n) >> 16``, whose probabilities are uniform to within a
    relative ``n / 65536`` (0.15% for 100 models).

    Each replicate's sums are shifted by the largest value that replicate drew (on each
    side), so they are exact for any spread of magnitudes: one value 90 nats above the
    others, missed by a replicate, leaves no sum of underflowed zeros.
    """
    dtype = x.dtype
    num_cols = x.shape[1]
    (m_in, m_out), (n_in, n_out), (tot_in, tot_out) = m, n, total
    order = jnp.argsort(~w, axis=1, stable=True)  # in-models first
    xs = jnp.take_along_axis(x, order, axis=1)
    slot = jnp.arange(num_cols, dtype=jnp.uint32)[None, :]
    is_in = slot < n_in[:, None].astype(jnp.uint32)
    side_n = jnp.where(is_in, n_in[:, None], n_out[:, None]).astype(jnp.uint32)
    side_start = jnp.where(is_in, 0, n_in[:, None]).astype(jnp.uint32)
    half_words = -(-num_cols // 2)

    def body(b, acc):
        sum_d, sum_d2 = acc
        bits = jax.vmap(
            lambda k: jax.random.bits(jax.random.fold_in(k, b), (half_words,), jnp.uint32)
        )(keys)
        r = jnp.concatenate([bits & 0xFFFF, bits >> 16], axis=1)[:, :num_cols]
        pos = side_start + ((r * side_n) >> 16)  # < 2**32 as models < 2**16
        drawn = jnp.take_along_axis(xs, pos.astype(jnp.int32), axis=1)
        # Shift by the largest value each replicate drew, not the side's maximum: a
        # replicate that misses a value ~88 nats above the others would sum only
        # underflowing terms (log 0) in float32.
        top_in = jnp.max(jnp.where(is_in, drawn, -jnp.inf), axis=1)
        top_out = jnp.max(jnp.where(is_in, -jnp.inf, drawn), axis=1)
        e = jnp.exp(drawn - jnp.where(is_in, top_in[:, None], top_out[:, None]))
        d_in = (top_in - m_in) + jnp.log(jnp.sum(jnp.where(is_in, e, 0), axis=1)) - jnp.log(tot_in)
        d_out = (top_out - m_out) + jnp.log(jnp.sum(jnp.where(is_in, 0, e), axis=1)) - jnp.log(tot_out)
        d = jnp.stack([d_in, d_out], axis=1)  # replicate minus point estimate, [B, 2]
        return sum_d + d, sum_d2 + d * d

    zero = jnp.zeros((x.shape[0], 2), dtype)
    sum_d, sum_d2 = jax.lax.fori_loop(0, num_bootstrap, body, (zero, zero))
    var = (sum_d2 - sum_d * sum_d / num_bootstrap) / (num_bootstrap - 1)
    var = jnp.where(jnp.stack([n_in, n_out], axis=1) >= 2, jnp.maximum(var, 0), jnp.nan)
    return var[:, 0], var[:, 1]


def _welch(var_a, var_b, n_a, n_b):
    """Standard error and Welch-Satterthwaite degrees of freedom of a difference."""
    var = var_a + var_b
    dtype = var.dtype
    denom = var_a**2 / jnp.maximum(n_a - 1, 1).astype(dtype) + var_b**2 / jnp.maximum(
        n_b - 1, 1
    ).astype(dtype)
    pooled = (n_a + n_b - 2).astype(dtype)
    dof = jnp.where(denom > 0, var * var / jnp.where(denom > 0, denom, 1), pooled)
    # A side with one model has no variance estimate, hence no dof either.
    dof = jnp.where(jnp.isnan(var), jnp.nan, dof)
    return jnp.sqrt(var), dof


def _scores_block(sharded, replicated, *, method, num_bootstrap):
    x, w, idx = sharded  # x: [B, models], w: [B, models] bool, idx: [B] example indices
    (key,) = replicated
    m_in, s_in, n_in, e_in, tot_in = _logmeanexp_side(x, w)
    m_out, s_out, n_out, e_out, tot_out = _logmeanexp_side(x, ~w)
    if method == "jackknife":
        var_in = _jackknife_var(x, w, m_in, n_in, e_in, tot_in)
        var_out = _jackknife_var(x, ~w, m_out, n_out, e_out, tot_out)
    else:
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
        var_in, var_out = _bootstrap_var(
            x, w, (m_in, m_out), (n_in, n_out), (tot_in, tot_out), keys, num_bootstrap
        )
    stderr, dof = _welch(var_in, var_out, n_in, n_out)
    # Subtract the (large) maxima first: one rounding, instead of rounding U and V.
    M = (m_in - m_out) + (s_in - s_out)
    return m_in + s_in, m_out + s_out, M, stderr, dof, n_in, n_out


@functools.partial(jax.jit, static_argnames=("mesh", "method", "num_bootstrap"))
def _scores_program(ll, keep, key, quantile, rank, *, mesh, method, num_bootstrap):
    n = ll.shape[1]
    sharded = (ll.T, keep.T, jnp.arange(n, dtype=jnp.int32))
    block = functools.partial(_scores_block, method=method, num_bootstrap=num_bootstrap)
    U, V, M, stderr, dof, n_in, n_out = shard_examples(block, mesh, sharded, (key,))
    flags, threshold = _quantile_flags(M, quantile, rank)
    return Scores(
        U=U,
        V=V,
        M=M,
        stderr=stderr,
        dof=dof,
        n_in=n_in.astype(jnp.int32),
        n_out=n_out.astype(jnp.int32),
        highly_memorized=flags,
        threshold=threshold,
    )


def _quantile_rank(n: int, q: float) -> int:
    """The rank ``k`` (0-based, ascending) of the sorted value at or below the ``q``
    quantile of ``n`` values: ``floor(q (n - 1))`` in float64, the index at which
    :func:`numpy.quantile` (linear interpolation) starts interpolating."""
    return min(max(int(np.floor((n - 1) * float(q))), 0), n - 1)


def _quantile_flags(scores, q, rank):
    """``(scores above their q quantile, the quantile)``. The quantile lies in
    ``[s_k, s_{k+1})`` (``s`` sorted, ``k`` = :func:`_quantile_rank`), so a score lies above
    it exactly when it lies above ``s_k``: flagged by rank. ``scores > threshold`` rounds
    instead: a float32 threshold between two scores an ulp apart rounds onto the larger,
    which then went unflagged."""
    threshold = jnp.quantile(scores, q)  # linear interpolation, numpy's default
    return scores > jnp.sort(scores)[rank], threshold


# ------------------------------------------------------------------- public API
def memorization_scores(
    ll: Any,
    keep: Any,
    *,
    mesh: Mesh | None = None,
    quantile: float = 0.95,
    uncertainty: str = "jackknife",
    num_bootstrap: int = 200,
    key: jax.Array | None = None,
) -> Scores:
    r"""Leave-one-out density-ratio memorization scores (van den Burg & Williams 2021).

    For each example ``i``, with ``I`` the models that trained on it and ``O`` the
    models that held it out:

    .. math::

      U_i = \log \frac{1}{|I|} \sum_{m \in I} e^{ll_{m,i}}, \qquad
      V_i = \log \frac{1}{|O|} \sum_{m \in O} e^{ll_{m,i}}, \qquad M_i = U_i - V_i

    i.e. densities are averaged over models, not log-densities. Every sum is shifted
    by its own maximum, so log-likelihoods of -1e5, and examples whose in- and
    out-values differ by orders of magnitude, give results exact to float rounding.

    Uncertainty is over the ensemble's models, treating the in- and the out-models
    as two independent samples (they are disjoint): ``stderr^2 = var(U) + var(V)``.

    * ``"jackknife"`` (default, deterministic): delete-one-model jackknife of ``U``
      over the in-models and of ``V`` over the out-models.
    * ``"bootstrap"``: ``num_bootstrap`` resamples of the in-models and of the
      out-models (with replacement, within each group), per example, from
      ``key`` folded with the example index.

    Both need two models on a side; with one, ``stderr`` is NaN (not estimable). ``dof`` holds
    Welch-Satterthwaite degrees of freedom for t intervals (:meth:`Scores.interval`).

    Measured coverage of nominal 95% intervals for a known true score (4,000 examples;
    ``exp(ll)`` log-normal with sigma = 0.5 nats around -100, so ``log E p`` and hence
    the true ``M`` are known; binomial sd 0.0035; ``tests/test_scores.py``)::

        in / out   jackknife normal / t   bootstrap (200) normal / t
        40 / 40        0.946 / 0.951          0.939 / 0.943
        10 / 10        0.935 / 0.952          0.916 / 0.937
        90 / 10        0.913 / 0.939          0.895 / 0.924
        18 / 2         0.782 / 0.879          0.711 / 0.829
         8 / 2         0.821 / 0.903          0.751 / 0.859

    (The 2-out rows: ``kfold(4000, 10 or 5, repeats=2, seed=1)``, mean of 5 draws of
    ``ll``, seeds 2-6, each within 0.013 of it; the others one draw, seed 2.)

    The 90/10 shortfall that t intervals do not recover is the Jensen bias of ``V``,
    a log of a mean of only 10 densities: ``~(e^{sigma^2} - 1) / (2 n_out)`` = +0.014
    nats against a standard error of 0.17. The bootstrap's plug-in variance runs
    ``(n - 1) / n`` low, hence its slightly lower coverage. With 2 held-out models
    (18 / 2 is ``jaxmem run``'s default of 10 folds x 2 repeats) the intervals
    under-cover badly: the variance of ``V`` rests on 2 values (median Welch dof 1.6)
    and its Jensen bias is +0.06 nats (measured) against a median standard error of
    0.27. Usable intervals need more repeats (more out-models per example: 10 x 10
    gives the 90 / 10 row).

    Args:
      ll: float ``[models, examples]``, log-likelihoods in nats (numpy or JAX).
      keep: bool ``[models, examples]`` or a :class:`~jaxmem.membership.Plan`;
        True where the model trained on the example.
      mesh: 1-D device mesh to shard examples over (:func:`jaxmem.mesh.make_mesh`);
        ``None`` uses all devices of this process (under ``jax.distributed``, only this
        process's: see the module docstring).
      quantile: ``highly_memorized`` is ``M`` above this quantile of ``M`` over all
        examples (0.95 in the paper; 0.995 / 0.999 for its figures).
      uncertainty: ``"jackknife"`` or ``"bootstrap"``.
      num_bootstrap: number of bootstrap replicates (``"bootstrap"`` only), an
        integer >= 2 (>= 1 when unused).
      key: one PRNG key for the bootstrap (``jax.random.key(seed)``; a raw
        ``jax.random.PRNGKey(seed)`` works too); ``None`` means ``jax.random.key(0)``.

    Returns:
      :class:`Scores`, arrays ``[examples]``.

    Raises:
      ValueError: ``ll`` contains NaN or inf (the message names the (model, example)
        pairs; checked first), ``ll`` and ``keep`` differ in shape, some example has
        no in- or no out-model (named), or an option is out of range or of the wrong
        kind (each named: ``quantile`` not a real number in [0, 1], ``num_bootstrap``
        not a positive integer, ``key`` not a single PRNG key or None).
      TypeError: ``ll`` is not floating (a ``keep`` that is not boolean is a ValueError
        that names ``.astype(bool)``).

    Examples:
      >>> import numpy as np, jaxmem
      >>> plan = jaxmem.membership.kfold(50, k=5, repeats=2, seed=0)
      >>> ll = np.random.default_rng(0).normal(-10, 1, plan.keep.shape).astype("f4")
      >>> s = memorization_scores(ll, plan, mesh=jaxmem.make_mesh(1))
      >>> s.M.shape, int(s.n_in[0]), int(s.n_out[0])
      ((50,), 8, 2)

    References:
      van den Burg & Williams, "On Memorization in Probabilistic Deep Generative
      Models", NeurIPS 2021.
    """
    ll = _check_values(ll, "ll")
    if jnp.issubdtype(ll.dtype, jnp.bool_):
        raise TypeError("ll must be a floating array of log-likelihoods (nats), got bool")
    plan = _as_plan(keep, ll.shape, "ll")
    quantile = _check_quantile(quantile)
    if uncertainty not in _UNCERTAINTY:
        raise ValueError(f"uncertainty must be one of {_UNCERTAINTY}, got {uncertainty!r}")
    num_bootstrap = _check_num_bootstrap(num_bootstrap, uncertainty)
    key = _check_key(key)
    if uncertainty == "bootstrap" and plan.num_models >= 2**16:
        # the resampling draws 16-bit random indices (see _bootstrap_var)
        raise ValueError(f"bootstrap supports up to 65535 models, got {plan.num_models}")
    dtype = _float_dtype(ll)
    shift = None
    if jnp.dtype(ll.dtype).itemsize > dtype.itemsize:
        # Float64 log-likelihoods computed in float32 (x64 off): shift each example by its
        # largest value first, in float64, so that only the differences between models
        # (what M, its error and the flags depend on) are rounded, not values of -1e6 whose
        # float32 spacing is 0.06 nats. U and V get the shift back.
        ll64 = np.asarray(ll, np.float64)
        shift = ll64.max(axis=0)
        ll = ll64 - shift
    scores = _scores_program(
        jnp.asarray(ll, dtype),
        jnp.asarray(plan.keep),
        key,
        jnp.asarray(quantile, dtype),
        jnp.int32(_quantile_rank(plan.n, quantile)),
        mesh=_resolve_mesh(mesh),
        method=uncertainty,
        num_bootstrap=num_bootstrap if uncertainty == "bootstrap" else 0,
    )
    if shift is not None:
        scores = scores._replace(U=scores.U + jnp.asarray(shift, dtype), V=scores.V + jnp.asarray(shift, dtype))
    return scores


def _label_block(sharded, replicated):
    x, w = sharded  # [B, models]
    del replicated
    out = []
    for mask in (w, ~w):
        n = jnp.sum(mask, axis=1)
        nf = n.astype(x.dtype)
        mean = jnp.sum(jnp.where(mask, x, 0), axis=1) / nf
        dev = jnp.where(mask, x - mean[:, None], 0)
        var = jnp.sum(dev * dev, axis=1) / jnp.maximum(nf - 1, 1)
        # variance of the mean, undefined for a single model
        out.append((mean, jnp.where(n >= 2, var / nf, jnp.nan), n))
    (mean_in, v_in, n_in), (mean_out, v_out, n_out) = out
    return mean_in - mean_out, mean_in, mean_out, jnp.sqrt(v_in + v_out), n_in, n_out


@functools.partial(jax.jit, static_argnames=("mesh",))
def _label_program(values, keep, *, mesh):
    mem, mean_in, mean_out, stderr, n_in, n_out = shard_examples(
        _label_block, mesh, (values.T, keep.T)
    )
    return LabelMemorization(
        mem, mean_in, mean_out, stderr, n_in.astype(jnp.int32), n_out.astype(jnp.int32)
    )


def feldman_zhang(
    correct_or_logp: Any,
    keep: Any,
    *,
    mesh: Mesh | None = None,
) -> LabelMemorization:
    r"""Feldman & Zhang (2020) label memorization from per-model predictions.

    .. math::

      \mathrm{mem}_i = \frac{1}{|I|} \sum_{m \in I} c_{m,i}
                     - \frac{1}{|O|} \sum_{m \in O} c_{m,i}

    with ``c`` either the correctness ``1[h_m(x_i) = y_i]`` (pass a bool array: the
    estimator of the paper, a difference of accuracies in [-1, 1]) or
    ``log p_m(y_i | x_i)`` (pass a float array: a difference of *mean* log-probs in
    nats). For the density-ratio version (log of mean probabilities), call
    :func:`memorization_scores` on the log-probs instead.

    Args:
      correct_or_logp: bool ``[models, examples]`` correctness, or float
        ``[models, examples]`` log-probabilities of the true label (nats, <= 0).
      keep: bool ``[models, examples]`` or a :class:`~jaxmem.membership.Plan`.
      mesh: device mesh to shard examples over; ``None`` uses all devices of this
        process (under ``jax.distributed``, only this process's: see the module docstring).

    Returns:
      :class:`LabelMemorization`, arrays ``[examples]``, with a Welch standard error.

    Raises:
      ValueError: non-finite log-probs (named), log-probs above 0 (a float 0/1 array
        is refused: pass correctness as bool), shape mismatch, or an example with no
        in- or out-model (named).
      TypeError: ``correct_or_logp`` is neither floating nor bool (e.g. 0/1 integers:
        the message asks for floats or bool).

    References:
      Feldman & Zhang, "What Neural Networks Memorize and Why: Discovering the Long
      Tail via Influence Estimation", NeurIPS 2020.
    """
    values = _check_values(
        correct_or_logp, "correct_or_logp",
        "floats (log p(y|x) of the true label, nats) or bool (correctness; 0/1 integers: pass .astype(bool))",
    )
    if jnp.issubdtype(values.dtype, jnp.bool_):
        dtype = jnp.dtype(jnp.float32)
    else:
        positive = _bad_pairs(values, lambda v, xp: v > 0)
        if positive:
            raise ValueError(
                f"correct_or_logp as floats means log p(y|x) <= 0, but it is positive at {positive}; "
                "pass correctness as a bool array"
            )
        dtype = _float_dtype(values)
    plan = _as_plan(keep, values.shape, "correct_or_logp")
    return _label_program(
        jnp.asarray(values, dtype), jnp.asarray(plan.keep), mesh=_resolve_mesh(mesh)
    )


def quantile_flags(scores: Any, quantile: float) -> tuple[jax.Array, jax.Array]:
    """Flag the examples whose score lies above the ``quantile`` quantile of all scores.

    This is the paper's "highly memorized" rule (quantile 0.95): the threshold is a
    quantile of the scores, not the score value 0.95.

    Args:
      scores: ``[examples]``, e.g. ``Scores.M`` (nats); integer scores are cast to
        the default float dtype (float32 unless x64 is enabled).
      quantile: in [0, 1]: 0 flags every score above the minimum, 1 flags none.

    Returns:
      ``(flags, threshold)``: bool ``[examples]`` and the scalar threshold (linear
      interpolation, as :func:`numpy.quantile`). A score is flagged when it lies above
      the quantile, decided by rank (above the ``k``-th smallest, ``k = floor(quantile * (n - 1))``
      in float64 as numpy places it):
      ``scores > threshold``, except that a threshold rounded onto a score (two scores a
      few ulps apart around the quantile) does not unflag it.

    Raises:
      ValueError: ``scores`` is not 1-D, is empty or holds NaN or inf (named), or
        ``quantile`` is not a real number in [0, 1].
      TypeError: ``scores`` is not real numbers (bool, complex, strings, objects).
    """
    if not hasattr(scores, "shape") or not hasattr(scores, "dtype"):
        scores = np.asarray(scores)
    if scores.dtype == np.bool_ or not (
        jnp.issubdtype(scores.dtype, jnp.integer) or jnp.issubdtype(scores.dtype, jnp.floating)
    ):
        raise TypeError(f"scores must be real numbers (integer or floating), got dtype {scores.dtype}")
    if jnp.issubdtype(scores.dtype, jnp.integer):
        scores = jnp.asarray(scores, jax.dtypes.canonicalize_dtype(jnp.float64))
    scores = jnp.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D [examples], got shape {scores.shape}")
    if scores.size == 0:
        raise ValueError("no scores: scores is empty (shape (0,)); a quantile needs at least one")
    bad = np.flatnonzero(~np.isfinite(np.asarray(scores)))
    if bad.size:  # one NaN would make the threshold, hence every flag, meaningless
        raise ValueError(f"scores has {bad.size} non-finite value(s), e.g. at example(s) {bad[:10].tolist()}")
    q = _check_quantile(quantile)
    return _quantile_flags_jit(scores, jnp.asarray(q, scores.dtype), jnp.int32(_quantile_rank(scores.size, q)))


_quantile_flags_jit = jax.jit(_quantile_flags)
