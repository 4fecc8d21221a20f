r"""The linear baseline: hat-matrix leverage, regression diagnostics and closed-form LOO scores.

For a design matrix ``X`` (``[n, p]``) the hat matrix is
:math:`H = X (X^\top X)^{-1} X^\top` and the leverage of example ``i`` is
:math:`h_i = H_{ii}`. Everything here is computed from a ``p x p`` factor of ``X`` in
:math:`O(n p^2)` time — the ``n x n`` matrix is never formed and nothing is refitted:

* :func:`leverage` — ``h`` by thin QR (:math:`h_i = \|Q_i\|^2`) or by Cholesky of the Gram
  matrix (:math:`h_i = \|L^{-1} x_i\|^2`); optionally with ``X``'s rows split over a device
  mesh (the Gram matrix is ``psum``-ed, ``h`` is computed locally per shard).
* :func:`leverage_streamed` — the same for ``X`` too large for memory: two passes over row
  blocks (accumulate the Gram matrix, then ``h`` block by block).
* :func:`influence` — OLS fit plus LOO residuals, PRESS, internal and external studentized
  residuals, Cook's distance, DFFITS and DFBETAS, all closed form.
* :func:`loo_log_density_ratio_regression` — the memorization score
  :math:`M_i = \log p(y_i | x_i, D) - \log p(y_i | x_i, D \setminus \{i\})` of Gaussian
  linear regression, for a plug-in and a flat-prior posterior predictive density.
* :func:`loo_log_density_ratio_gaussian` — the same score for a multivariate Gaussian
  fitted by maximum likelihood to the rows of ``X``.

Numerical conventions, shared by every function:

* **Precision.** ``dtype=None`` computes in float32 with ``precision="highest"`` matmuls
  (no TF32/bf16 passes on accelerators); ``dtype=jnp.float64`` computes inside
  ``jax.enable_x64(True)`` and returns float64 arrays. (Arithmetic on those arrays *outside*
  an x64 context silently drops to float32 — convert them with ``np.asarray`` first.)
* **Column equilibration.** Columns are scaled to unit norm before factoring. Leverage,
  fitted values and residuals do not depend on column scaling; the condition number
  :math:`\kappa` that matters below is that of the equilibrated ``X``. Where ``X^T X``
  would overflow, or a column's squares come near the dtype's underflow (mean square
  below ``tiny / eps``, about ``1e-31`` in float32), the Gram paths form it again from
  ``X`` with each column multiplied by a power of two that brings its largest ``|entry|``
  into ``[0.5, 1)`` (exact; one more pass over ``X``, only for such data), so columns of
  any scale (``1e-25`` or ``1e30`` in float32) give the same ``h`` as ``X``.
* **Rank.** Singular values of the equilibrated ``X`` below ``rcond * sigma_max`` count as
  zero, with ``rcond = sqrt(p * eps)`` by default (``eps`` of the compute dtype; 1.1e-7 for
  float64 with p = 50, 2.4e-3 for float32). That default sits at the rounding level of the
  Gram matrix (its eigenvalues are accurate to about ``p * eps * lambda_max``), so both methods
  agree on the rank. A rank-deficient ``X`` gets the **pseudo-inverse treatment**:
  :math:`H = X X^+` is the orthogonal projection onto the numerically retained column space
  (equal to dropping the redundant columns), every degree of freedom ``p`` becomes the rank
  ``r`` (row requirements too: the regression statistics need ``n >= r + 2``, checked after
  factoring; ``X`` may even have more columns than rows), and ``beta`` is the minimum-norm
  solution in equilibrated coordinates. The Gaussian density ratio instead refuses a
  singular covariance (it has no density).
* **Accuracy.** The relative error of ``h`` is about :math:`\epsilon \kappa` for QR and
  :math:`\epsilon \kappa^2` for Cholesky. When :math:`\epsilon \kappa^2 > 10^{-3}` on the
  Cholesky path a :class:`RuntimeWarning` says so and suggests ``method="qr"`` (and float64,
  when computing in float32). The Cholesky path's residuals err by up to
  :math:`\epsilon \kappa^2 \|y\|`, which reaches every statistic of :func:`influence` and
  the regression density ratio; their per-row precision warning counts it. A column with
  a large mean against its spread (e.g. a Unix timestamp beside an intercept) makes
  :math:`\kappa \sim 10^7`: use ``method="qr"`` there even in float64. The Gaussian density
  ratio's :math:`M_i` grows like :math:`1/(1 - h_i)`, which multiplies the leverage's
  relative error; its per-row warning names the rows whose :math:`M_i` may be off.
* **h_i = 1 rows.** A row with :math:`1 - h_i \le \sqrt{\epsilon}` is fitted exactly and its
  removal changes the rank: its LOO quantities are :math:`0/0`. They are returned as NaN and
  flagged in the ``undefined`` mask ``[n]`` of every result; PRESS is then NaN too.

The public functions validate on the host (shapes, NaN/inf with the offending index, the
row count against the rank found by factoring) and call jitted kernels; they are not
themselves jit-traceable.

References:
  van den Burg & Williams, *On Memorization in Probabilistic Deep Generative Models*,
  NeurIPS 2021. Belsley, Kuh & Welsch, *Regression Diagnostics*, Wiley 1980.
  Cook & Weisberg, *Residuals and Influence in Regression*, 1982.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax.sharding import Mesh

from jaxmem import _warn
from jaxmem.membership import _index_list
from jaxmem.mesh import as_mesh, shard_examples, sum_over_examples

__all__ = [
    "Influence",
    "LooDensityRatio",
    "leverage",
    "leverage_streamed",
    "influence",
    "loo_log_density_ratio_regression",
    "loo_log_density_ratio_gaussian",
]

_HI = jax.lax.Precision.HIGHEST
_METHODS = ("cholesky", "qr")
# eps * kappa^2 above this means h has fewer than ~3 correct digits on the Cholesky path.
_WARN_LOSS = 1e-3


class Influence(NamedTuple):
    """OLS fit and leave-one-out diagnostics; all closed form (no refits).

    ``n`` examples, ``p`` columns, ``r`` the numerical rank (``r = p`` for full rank).
    Rows flagged in ``undefined`` carry NaN in every LOO field.

    Attributes:
      beta: ``[p]`` least-squares coefficients.
      residuals: ``[n]`` ``e_i = y_i - x_i beta``.
      leverage: ``[n]`` ``h_i``.
      sigma2: scalar ``s^2 = sum(e^2) / (n - r)``.
      sigma2_loo: ``[n]`` ``s_(i)^2 = ((n - r) s^2 - e_i^2 / (1 - h_i)) / (n - r - 1)``, the
        residual variance of the fit without example ``i``.
      loo_residuals: ``[n]`` ``e_i / (1 - h_i) = y_i - x_i beta_(i)``.
      press: scalar ``sum_i (e_i / (1 - h_i))^2``.
      studentized_internal: ``[n]`` ``e_i / (s sqrt(1 - h_i))``.
      studentized_external: ``[n]`` ``e_i / (s_(i) sqrt(1 - h_i))``.
      cooks_distance: ``[n]`` ``t_i^2 h_i / (r (1 - h_i))`` with ``t`` internal.
      dffits: ``[n]`` ``t*_i sqrt(h_i / (1 - h_i))`` with ``t*`` external.
      dfbetas: ``[n, p]`` ``(beta - beta_(i))_j / (s_(i) sqrt([(X^T X)^+]_jj))``.
      undefined: ``[n]`` bool, ``1 - h_i <= sqrt(eps)``: LOO quantities undefined (NaN).
      rank: the numerical rank ``r`` (Python int).
    """

    beta: jax.Array
    residuals: jax.Array
    leverage: jax.Array
    sigma2: jax.Array
    sigma2_loo: jax.Array
    loo_residuals: jax.Array
    press: jax.Array
    studentized_internal: jax.Array
    studentized_external: jax.Array
    cooks_distance: jax.Array
    dffits: jax.Array
    dfbetas: jax.Array
    undefined: jax.Array
    rank: int


class LooDensityRatio(NamedTuple):
    """Per-example log-densities with and without the example, and their difference (nats).

    Attributes:
      log_p_in: ``[n]`` ``log p(x_i | D)`` (the paper's U_i for one model).
      log_p_out: ``[n]`` ``log p(x_i | D without x_i)`` (V_i); NaN where ``undefined``.
      score: ``[n]`` ``M_i = log_p_in - log_p_out``; NaN where ``undefined``.
      leverage: ``[n]`` the leverage ``h_i`` the score is a function of.
      undefined: ``[n]`` bool, ``1 - h_i <= sqrt(eps)``: the LOO model is undefined.
    """

    log_p_in: jax.Array
    log_p_out: jax.Array
    score: jax.Array
    leverage: jax.Array
    undefined: jax.Array


# --------------------------------------------------------------------------- validation


def _compute_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(np.float32 if dtype is None else dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


@contextlib.contextmanager
def _precision(dt: np.dtype) -> Iterator[None]:
    # jnp.asarray(float64) silently becomes float32 unless x64 is on.
    if dt == np.float64:
        with jax.enable_x64(True):
            yield
    else:
        yield


def _as_design(X: Any, dt: np.dtype, *, name: str = "X", rows=None) -> jax.Array:
    """``X`` as a ``dt`` array after shape checks. ``rows(p) -> (need, reason)`` states the
    caller's least row count that holds whatever the rank (checks that depend on the rank
    come after factoring); without it one row is enough."""
    shape = np.shape(X)
    if len(shape) != 2:
        hint = " (for a single regressor pass X[:, None])" if len(shape) == 1 else ""
        raise ValueError(f"{name} must be 2-D [n, p]; got shape {tuple(shape)}{hint}")
    n, p = shape
    if p == 0:
        raise ValueError(f"{name} has no columns (shape {tuple(shape)})")
    if np.iscomplexobj(X):
        raise ValueError(f"{name} is complex; leverage and the regression statistics need real numbers")
    need, reason = rows(p) if rows is not None else (1, "")
    if n < need:
        raise ValueError(f"{name} has n={n} rows and p={p} columns; this needs n >= {need}" + reason)
    return jnp.asarray(X, dtype=dt)


def _as_target(y: Any, n: int, dt: np.dtype) -> jax.Array:
    shape = np.shape(y)
    if shape != (n,):
        raise ValueError(f"y must have shape ({n},) to match X; got {tuple(shape)}")
    if np.iscomplexobj(y):
        raise ValueError("y is complex; the regression statistics need real numbers")
    y = jnp.asarray(y, dtype=dt)
    if not bool(_all_finite(y)):
        yh = np.asarray(y)
        i = int(np.argmin(np.isfinite(yh)))
        raise ValueError(f"y[{i}] is {yh[i]}: y must be finite")
    return y


def _raise_nonfinite(name: str, X: Any, row_offset: int = 0, dt: np.dtype | None = None) -> None:
    """Name the first entry of ``X`` (as computed in ``dt``, when given) that is not finite."""
    # Only reached when a Gram diagonal or column maximum is not finite, so the scan costs
    # nothing normally. (With the columns prescaled a finite X cannot overflow X^T X.)
    given = np.asarray(X)
    Xh = given if dt is None else given.astype(dt)
    bad = np.argwhere(~np.isfinite(Xh))
    if bad.size == 0:  # pragma: no cover - defensive
        raise ValueError(f"{name}^T {name} is not finite although {name} is")
    i, j = bad[0]
    where = f"{name}[{int(i) + row_offset}, {int(j)}]"
    if np.isfinite(given[i, j]):
        raise ValueError(f"{where} = {given[i, j]:g} does not fit in {Xh.dtype} (it becomes {Xh[i, j]}); "
                         f"pass dtype=jnp.float64, or rescale {name}")
    hint = ""
    if np.isinf(Xh[i, j]) and Xh.dtype == np.float32:
        hint = f" (an entry beyond float32's range, |x| > {float(np.finfo(np.float32).max):.3g}, becomes inf: " \
               "if yours was finite, pass dtype=jnp.float64)"
    raise ValueError(f"{where} is {Xh[i, j]}: {name} must be finite{hint}")


def _check_rcond(rcond: Any) -> None:
    """``rcond`` is None or a finite number in ``[0, 1)`` (1 or more would zero every direction)."""
    if rcond is None:
        return
    if isinstance(rcond, bool) or not isinstance(rcond, numbers.Real) or not 0 <= float(rcond) < 1:
        raise ValueError(
            f"rcond must be None (default sqrt(p * eps)) or a number in [0, 1), got {rcond!r}"
        )


def _default_rcond(p: int, dt: np.dtype) -> float:
    return math.sqrt(p * float(np.finfo(dt).eps))


# --------------------------------------------------------------------------- kernels


@jax.jit
def _all_finite(a: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(a))


@jax.jit
def _col_maxabs(X: jax.Array) -> jax.Array:
    """``[p]`` largest ``|entry|`` of each column."""
    return jnp.max(jnp.abs(X), axis=0)


def _prescale(maxabs: np.ndarray, dt: np.dtype) -> jax.Array:
    """``[p]`` powers of two ``2^k`` with ``maxabs * 2^k`` in ``[0.5, 1)`` (1 for zero columns)."""
    fi = np.finfo(dt)
    _, e = np.frexp(np.asarray(maxabs, dtype=np.float64))
    k = np.where(maxabs > 0, np.clip(-e, fi.minexp, fi.maxexp - 1), 0)
    return jnp.asarray(np.ldexp(1.0, k), dtype=dt)


def _suspect_columns(G: np.ndarray, n: int, dt: np.dtype) -> np.ndarray:
    """bool ``[p]``: columns whose Gram diagonal overflowed, or whose mean square is so
    small that products of their entries lose bits to underflow (below ``tiny / eps``;
    a product flushed there errs by at most ``eps`` of ``sqrt(G_aa G_bb)``)."""
    d = np.diagonal(G)
    fi = np.finfo(dt)
    return ~np.isfinite(d) | (d < n * (float(fi.tiny) / float(fi.eps)))


def _xtx(X: jax.Array, y: jax.Array | None):
    """``(X^T X,)``, or ``(X^T X, X^T y)`` when ``y`` is given."""
    g = jnp.matmul(X.T, X, precision=_HI)
    return (g,) if y is None else (g, jnp.matmul(X.T, y, precision=_HI))


def _prescaled(X: jax.Array, pre: jax.Array | None) -> jax.Array:
    return X if pre is None else X * pre


@jax.jit
def _moments(X: jax.Array, y: jax.Array | None, pre: jax.Array | None = None):
    """:func:`_xtx` of ``X * pre`` (``pre``: columns prescaled so the products stay in range)."""
    return _xtx(_prescaled(X, pre), y)


@jax.jit
def _moments_maxabs(X: jax.Array):
    """``(X^T X, [p] column max-abs)`` of one block of :func:`leverage_streamed`."""
    return _xtx(X, None)[0], jnp.max(jnp.abs(X), axis=0)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _moments_sharded(X: jax.Array, y: jax.Array | None, pre: jax.Array | None, mesh: Mesh):
    """:func:`_moments` with X's rows split over ``mesh``; partial sums psum-ed."""
    return sum_over_examples(lambda rows: _xtx(*rows), mesh, (_prescaled(X, pre), y))


@jax.jit
def _spectral(G: jax.Array):
    """Equilibrate the Gram matrix and factor it both ways (p x p work only)."""
    dg = jnp.diagonal(G)
    scale = jnp.where(dg > 0, jax.lax.rsqrt(jnp.where(dg > 0, dg, 1)), 1)
    Gs = G * scale[:, None] * scale[None, :]
    lam, V = jnp.linalg.eigh(Gs)
    L = jnp.linalg.cholesky(Gs)
    # W = L^{-T}: then h_i = ||x_i W||^2 is one GEMM (faster than a TRSM on most backends).
    W = jsl.solve_triangular(L, jnp.eye(G.shape[0], dtype=G.dtype), lower=True).T
    logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(L))) - 2 * jnp.sum(jnp.log(scale))
    return scale, lam, V, W, logdet


@jax.jit
def _qr(X: jax.Array):
    Q, R = jnp.linalg.qr(X, mode="reduced")
    # ||X[:, j]|| = ||R[:, j]||, taken relative to the column's largest entry: squaring
    # entries beyond ~1e19 (or below ~1e-19) overflows (underflows) in float32.
    big = jnp.max(jnp.abs(R), axis=0)
    big = jnp.where(big > 0, big, 1)
    scale = 1 / (big * jnp.sqrt(jnp.sum((R / big) ** 2, axis=0)))
    scale = jnp.where(jnp.isfinite(scale), scale, 1)  # zero column
    Rs = R * scale[None, :]
    U, sv, Vt = jnp.linalg.svd(Rs)
    W = jsl.solve_triangular(Rs, jnp.eye(R.shape[1], dtype=R.dtype), lower=False)
    logdet = 2 * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(Rs)))) - 2 * jnp.sum(jnp.log(scale))
    return Q, scale, U, sv, Vt, W, logdet


def _rows_h(x, params):
    pre, scale, W = params
    z = jnp.matmul(_prescaled(x, pre) * scale, W, precision=_HI)
    return jnp.sum(z * z, axis=1)


def _rows_fit(xy, params):
    x, y = xy
    pre, scale, W, beta_s = params
    xs = _prescaled(x, pre) * scale
    z = jnp.matmul(xs, W, precision=_HI)
    e = y - jnp.matmul(xs, beta_s, precision=_HI)
    return jnp.sum(z * z, axis=1), z, e


_rows_h_jit = jax.jit(_rows_h)
_rows_fit_jit = jax.jit(_rows_fit)


@jax.jit
def _row_sq_norms(Z):
    return jnp.sum(Z * Z, axis=1)


@jax.jit
def _center(X):
    return X - jnp.mean(X, axis=0)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _rows_h_sharded(X, pre, scale, W, mesh):
    return shard_examples(_rows_h, mesh, X, (pre, scale, W))


@functools.partial(jax.jit, static_argnames=("mesh",))
def _rows_fit_sharded(X, y, pre, scale, W, beta_s, mesh):
    return shard_examples(_rows_fit, mesh, (X, y), (pre, scale, W, beta_s))


# --------------------------------------------------------------------------- factor


class _Factor(NamedTuple):
    pre: jax.Array | None  # [p] powers of two applied before the Gram matrix, or None (none)
    scale: jax.Array  # [p] column equilibration (of X * pre)
    W: jax.Array  # [p, r], (X_s^T X_s)^+ = W W^T
    Z: jax.Array | None  # [n, r] = X_s W (QR path only; orthonormal columns)
    rank: int
    logdet: float  # log det X^T X (meaningful only when rank == p)
    # condition number of the equilibrated X over the kept directions (the Cholesky path's
    # residuals err by ~eps kappa^2 ||y||, the QR path's by ~eps kappa ||y||)
    kappa: float = float("nan")


def _whitener(
    G: jax.Array, pre: jax.Array | None, p: int, dt: np.dtype, rcond: float | None, warn: bool,
    n: int | None = None,
) -> _Factor:
    """Factor of the Gram matrix ``G`` of ``X * pre`` (of ``X`` for ``pre=None``)."""
    scale, lam, V, W, logdet = _spectral(G)
    logdet = float(logdet)
    if pre is not None:  # log det X^T X = log det G - 2 sum log pre (powers of two: exact)
        logdet -= 2 * float(np.sum(np.log(np.asarray(pre, dtype=np.float64))))
    lam_h = np.asarray(lam, dtype=np.float64)
    sv = np.sqrt(np.clip(lam_h, 0, None))
    tol = (rcond if rcond is not None else _default_rcond(p, dt)) * sv[-1]
    keep = sv > tol
    rank = int(keep.sum())
    if rank == 0:
        raise ValueError("X is zero: it has rank 0")
    kappa = float(sv[-1] / sv[keep].min())  # sv ascending: sv[-1] / sv[0] at full rank
    if rank == p and np.all(np.isfinite(np.asarray(W))):
        if warn and float(np.finfo(dt).eps) * kappa**2 > _WARN_LOSS:
            cure = "method='qr'" if dt == np.float64 else "method='qr' or dtype=float64"
            _warn.warn(
                f"X is ill-conditioned (condition number {kappa:.3g} after column "
                f"equilibration): Cholesky leverage in {dt} has relative error ~ "
                f"{float(np.finfo(dt).eps) * kappa**2:.2g}; use {cure}",
                RuntimeWarning,
            )
        return _Factor(pre, scale, W, None, p, logdet, kappa)
    # Pseudo-inverse: keep the eigen-directions above the tolerance.
    if warn:
        _warn_if_cut(rank, p, int(np.sum(np.diagonal(np.asarray(G)) == 0)), dt, tol / sv[-1], n)
    idx = np.nonzero(keep)[0]
    Wp = V[:, idx] * jax.lax.rsqrt(lam[idx])[None, :]
    return _Factor(pre, scale, Wp, None, rank, float("nan"), kappa)


def _warn_if_cut(rank: int, p: int, zero_columns: int, dt: np.dtype, rel_tol: float, n: int | None = None,
                 *, qr: bool = False) -> None:
    """Warn when directions other than all-zero columns fall below the rank tolerance.

    Such an ``X`` is exactly collinear, or full rank but too ill-conditioned to resolve in
    ``dt``: either way the results are those of the pseudo-inverse (the kept directions'
    span), which differ from a full-rank fit's, so it is said rather than done silently.
    All-zero columns (e.g. image pixels that are always 0) are dropped without a word.
    """
    cut = p - rank - zero_columns
    if cut > 0:
        if n is not None and p - zero_columns > n:  # wide: no full-rank fit exists
            cure = (f"X has only n={n} rows for its {p - zero_columns} non-zero columns, so at most {n} "
                    "directions can be kept; rcond sets the cut")
        else:
            missing = [opt for opt, used in (("dtype=jnp.float64", np.dtype(dt) == np.float64),
                                             ("method='qr'", qr)) if not used]
            cure = (f"If X is full rank, use {' and '.join(missing)}; rcond sets the cut" if missing else
                    "In float64 by QR this is X's own rank (columns that are linear combinations of "
                    "others): drop one of each dependent set; rcond sets the cut")
        _warn.warn(
            f"X has numerical rank {rank} of {p} columns in {np.dtype(dt).name}: {cut} direction(s) besides "
            f"all-zero columns have singular values below {rel_tol:.2g} x the largest (after column "
            f"equilibration) and are dropped (pseudo-inverse). {cure}",
            RuntimeWarning,
        )


def _qr_keep(sv: jax.Array, p: int, dt: np.dtype, rcond: float | None) -> tuple[np.ndarray, float]:
    """The QR path's rank cut: which of ``_qr``'s singular values (descending) are kept, and
    the cut relative to the largest."""
    sv_h = np.asarray(sv, dtype=np.float64)
    rel = rcond if rcond is not None else _default_rcond(p, dt)
    return sv_h > rel * sv_h[0], rel


def _qr_rank(X: np.ndarray) -> int:
    """The numerical rank ``method='qr'`` with ``dtype=float64`` finds in ``X`` (same
    equilibration, same cut): what the fit keeps, for callers that name dropped columns."""
    with jax.enable_x64(True):
        sv = _qr(_tall(jnp.asarray(X, dtype=jnp.float64)))[3]
        return int(_qr_keep(sv, X.shape[1], np.dtype(np.float64), None)[0].sum())


def _tall(X: jax.Array) -> jax.Array:
    """``X`` with zero rows appended up to ``p`` rows when ``n < p`` (a wide ``X`` has rank
    ``< p``; the zero rows change neither ``X^T X`` nor the column space's projection of the
    real rows, and give ``_qr`` the square ``R`` it inverts)."""
    n, p = X.shape
    return X if n >= p else jnp.concatenate([X, jnp.zeros((p - n, p), X.dtype)])


def _factor_qr(X: jax.Array, dt: np.dtype, rcond: float | None) -> _Factor:
    n, p = X.shape
    Q, scale, U, sv, Vt, W, logdet = _qr(_tall(X))
    keep, rel = _qr_keep(sv, p, dt, rcond)
    rank = int(keep.sum())
    if rank == 0:
        raise ValueError("X is zero: it has rank 0")
    sv_h = np.asarray(sv, dtype=np.float64)
    kappa = float(sv_h[0] / sv_h[keep].min())  # descending
    if rank == p:
        return _Factor(None, scale, W, Q, p, float(logdet), kappa)
    _warn_if_cut(rank, p, int(jnp.sum(jnp.all(X == 0, axis=0))), dt, rel, n, qr=True)
    idx = np.nonzero(keep)[0]
    Z = jnp.matmul(Q[:n], U[:, idx], precision=_HI)
    Wp = Vt[idx].T / sv[idx][None, :]
    return _Factor(None, scale, Wp, Z, rank, float("nan"), kappa)


def _check_method(method: str, mesh: Mesh | None) -> Mesh | None:
    """``mesh`` as the kernels need it (:func:`jaxmem.mesh.as_mesh`; None stays None)."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "qr" and mesh is not None:
        raise ValueError(
            "method='qr' has no sharded path; use method='cholesky' with mesh "
            "(the Gram matrix is psum-ed over the mesh)"
        )
    return None if mesh is None else as_mesh(mesh)


def _gram(X, y, pre, mesh):
    return _moments(X, y, pre) if mesh is None else _moments_sharded(X, y, pre, mesh)


def _factor(X, y, method, rcond, mesh, dt):
    """Returns (factor, (X * factor.pre)^T y or None)."""
    if method == "qr":
        # QR needs no Gram matrix (nor X^T y: it projects y with Q directly).
        if not bool(_all_finite(X)):
            _raise_nonfinite("X", X)
        return _factor_qr(X, dt, rcond), None
    moments, pre = _gram(X, y, None, mesh), None
    suspect = _suspect_columns(np.asarray(moments[0], dtype=np.float64), X.shape[0], dt)
    if suspect.any():
        maxabs = np.asarray(_col_maxabs(X))
        if not np.all(np.isfinite(maxabs)):
            _raise_nonfinite("X", X)
        if np.any(maxabs[suspect] > 0):  # not only all-zero columns: form it again, prescaled
            pre = _prescale(maxabs, dt)
            moments = _gram(X, y, pre, mesh)
    f = _whitener(moments[0], pre, X.shape[1], dt, rcond, warn=True, n=X.shape[0])
    return f, (moments[1] if y is not None else None)


def _leverage_of(X, f: _Factor, mesh):
    """``h`` (or ``d``) of the rows of ``X`` from its factor, on ``mesh`` if given."""
    if f.Z is not None:  # QR: the rows of Z = X_s W are orthonormal already
        return _row_sq_norms(f.Z)
    if mesh is None:
        return _rows_h_jit(X, (f.pre, f.scale, f.W))
    return _rows_h_sharded(X, f.pre, f.scale, f.W, mesh)


# --------------------------------------------------------------------------- public API


def leverage(
    X: Any,
    *,
    method: str = "cholesky",
    rcond: float | None = None,
    dtype: Any = None,
    mesh: Mesh | None = None,
) -> jax.Array:
    r"""Diagonal of the hat matrix, :math:`h_i = x_i^\top (X^\top X)^+ x_i`, without forming it.

    .. math::
       h_i = \|Q_i\|^2 \ (X = QR) \quad\text{or}\quad h_i = \|L^{-1} x_i\|^2 \ (X^\top X = L L^\top)

    Cost :math:`O(n p^2)` time, :math:`O(n p)` memory. With ``mesh`` (Cholesky only) the rows
    of ``X`` are split over the mesh's devices, the per-shard Gram matrices are ``psum``-ed and
    ``h`` is computed on each shard for its own rows. See the module docstring for precision,
    rank and accuracy conventions.

    Args:
      X: ``[n, p]`` design matrix, finite, ``n >= 1`` (``n <= p`` is allowed: the rank is
        then at most ``n`` and ``X`` gets the pseudo-inverse treatment).
      method: ``"cholesky"`` (Gram matrix; fastest, error ~ eps kappa^2) or ``"qr"`` (thin
        Householder QR; error ~ eps kappa).
      rcond: singular values of the column-equilibrated ``X`` at or below
        ``rcond * sigma_max`` are treated as zero (pseudo-inverse); a number in ``[0, 1)``
        (0 keeps every nonzero one). Default ``sqrt(p * eps)``.
      dtype: ``None`` (float32, ``precision="highest"``) or ``jnp.float64``.
      mesh: optional 1-D mesh from :func:`jaxmem.mesh.make_mesh` to shard the rows over.

    Returns:
      ``[n]`` leverages in ``[0, 1]``; they sum to the rank of ``X``.

    Raises:
      ValueError: ``X`` not 2-D or without rows, a non-finite entry (its index is named), an
        all-zero ``X``, ``rcond`` not in ``[0, 1)``, an unknown method, or ``method="qr"`` with
        a mesh.

    Examples:
      >>> import numpy as np, jaxmem.linear as jl
      >>> X = np.c_[np.ones(5), np.arange(5.0)]
      >>> np.round(np.asarray(jl.leverage(X, dtype=np.float64)), 3)
      array([0.6, 0.3, 0.2, 0.3, 0.6])
    """
    dt = _compute_dtype(dtype)
    mesh = _check_method(method, mesh)
    _check_rcond(rcond)
    with _precision(dt):
        X = _as_design(X, dt)
        f, _ = _factor(X, None, method, rcond, mesh, dt)
        return _leverage_of(X, f, mesh)


def _check_out(out: Any, n: int | None) -> None:
    """``out`` for :func:`leverage_streamed`: a writeable floating ``[n]`` ndarray."""
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy array (or memmap), got {type(out).__name__}")
    if not np.issubdtype(out.dtype, np.floating):
        raise ValueError(f"out must have a floating-point dtype (leverages are in [0, 1]), got {out.dtype}")
    if out.ndim != 1 or (n is not None and out.shape != (n,)):
        want = "[n]" if n is None else f"({n},)"
        raise ValueError(f"out must have shape {want}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array (e.g. a memmap opened with mode='r+')")


def leverage_streamed(
    blocks: Any,
    *,
    num_blocks: int | None = None,
    block_rows: int = 65536,
    rcond: float | None = None,
    dtype: Any = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    r"""Leverage of an ``X`` that is never held whole: two passes over row blocks.

    Pass 1 accumulates :math:`X^\top X = \sum_b X_b^\top X_b` (each block product on the
    default device in ``dtype``, the running sum in float64 on the host so that millions of
    rows do not accumulate rounding); the ``p x p`` factor is then formed as in
    :func:`leverage` (Cholesky path); pass 2 computes ``h`` block by block. Memory is one block
    plus the ``[n]`` output (which may itself be a memmap via ``out``). Where a column's
    squares leave the dtype's range (see the module's notes), pass 1 runs once more with
    the columns prescaled by powers of two.

    Args:
      blocks: either an array-like ``[n, p]`` that supports row slicing without loading the
        rest (``np.memmap``, ``np.load(..., mmap_mode="r")``, h5py dataset), read in blocks of
        ``block_rows`` rows; or a callable ``blocks(b) -> [n_b, p]`` returning block
        ``b = 0 .. num_blocks - 1`` (called twice per block, three times for columns out of
        range, so it must be deterministic, e.g. generated from a seed).
      num_blocks: number of blocks; required with a callable.
      block_rows: rows per block when ``blocks`` is an array.
      rcond: rank tolerance, as in :func:`leverage`.
      dtype: ``None`` (float32) or ``jnp.float64``.
      out: optional writeable ``[n]`` floating-point numpy array (or memmap) to write ``h``
        into.

    Returns:
      ``[n]`` numpy array of leverages (``out`` if given).

    Raises:
      ValueError: a block of the wrong shape, a non-finite entry (global row index named),
        no rows, a callable without ``num_blocks``, ``rcond`` not in ``[0, 1)``, or an
        ``out`` that is not a writeable floating-point ``[n]`` array (checked before pass 1
        where ``n`` is known from ``blocks``, else after it).
    """
    dt = _compute_dtype(dtype)
    _check_rcond(rcond)
    if out is not None:
        _check_out(out, None)
    if callable(blocks):
        if num_blocks is None or num_blocks < 1:
            raise ValueError("a callable `blocks` needs num_blocks >= 1")
        get = blocks
        nb = num_blocks
    else:
        shape = np.shape(blocks)
        if len(shape) != 2:
            raise ValueError(f"blocks must be 2-D [n, p] or a callable; got shape {tuple(shape)}")
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        nb = -(-shape[0] // block_rows)
        if out is not None:
            _check_out(out, shape[0])

        def get(b):
            return blocks[b * block_rows : (b + 1) * block_rows]

    with _precision(dt):
        G = maxabs = None
        sizes = []
        row = 0
        for b in range(nb):
            xb = np.asarray(get(b))
            if xb.ndim != 2 or (G is not None and xb.shape[1] != G.shape[0]):
                want = "[n_b, p]" if G is None else f"[n_b, {G.shape[0]}]"
                raise ValueError(f"block {b} has shape {xb.shape}; expected {want}")
            g, m = _moments_maxabs(jnp.asarray(xb, dtype=dt))
            m = np.asarray(m, dtype=np.float64)
            if not np.all(np.isfinite(m)):
                _raise_nonfinite("X", xb, row_offset=row, dt=dt)
            g = np.asarray(g, dtype=np.float64)
            G, maxabs = (g, m) if G is None else (G + g, np.maximum(maxabs, m))
            sizes.append(xb.shape[0])
            row += xb.shape[0]
        if G is None:
            raise ValueError("X has n=0 rows; this needs n >= 1")
        n, p = row, G.shape[0]
        if n == 0:
            raise ValueError(f"X has n=0 rows and p={p} columns; this needs n >= 1")
        if out is not None:
            _check_out(out, n)
        pre = None
        suspect = _suspect_columns(G, n, dt)
        if np.any(maxabs[suspect] > 0):  # squares out of the dtype's range: once more, prescaled
            pre = _prescale(maxabs, dt)
            G = 0
            for b in range(nb):
                xb = np.asarray(get(b))
                if xb.shape[0] != sizes[b]:
                    raise ValueError(f"block {b} changed size between passes: {sizes[b]} -> {xb.shape[0]}")
                G = G + np.asarray(_moments(jnp.asarray(xb, dtype=dt), None, pre)[0], dtype=np.float64)
        f = _whitener(jnp.asarray(G, dtype=dt), pre, p, dt, rcond, warn=True, n=n)
        h = out if out is not None else np.empty(n, dtype=dt)
        row = 0
        for b in range(nb):
            xb = np.asarray(get(b))
            if xb.shape[0] != sizes[b]:
                raise ValueError(f"block {b} changed size between passes: {sizes[b]} -> {xb.shape[0]}")
            h[row : row + sizes[b]] = np.asarray(_rows_h_jit(jnp.asarray(xb, dtype=dt), (f.pre, f.scale, f.W)))
            row += sizes[b]
        return h


class _Fit(NamedTuple):
    n: int
    rank: int
    h: jax.Array
    e: jax.Array
    Z: jax.Array  # [n, r], X_s W
    W: jax.Array
    beta: jax.Array


@jax.jit
def _qr_fit(Z, y, W, scale):
    t = jnp.matmul(Z.T, y, precision=_HI)
    e = y - jnp.matmul(Z, t, precision=_HI)
    return jnp.sum(Z * Z, axis=1), e, scale * jnp.matmul(W, t, precision=_HI)


@jax.jit
def _gram_coef(Xty, W, pre, scale):
    # Xty = (X * pre)^T y; X_s = X * pre * scale, beta = pre * scale * beta_s.
    t = jnp.matmul(W.T, Xty * scale, precision=_HI)
    beta_s = jnp.matmul(W, t, precision=_HI)
    return beta_s, _prescaled(scale * beta_s, pre)


def _loo_basics(h, e, eps):
    """(undefined mask, 1 - h with NaN where undefined, SSE, LOO residuals, SSE_(i))."""
    omh = 1 - h
    undefined = omh <= math.sqrt(eps)
    # NaN where undefined, so that every LOO quantity of such a row is NaN, not huge.
    omh = jnp.where(undefined, jnp.nan, omh)
    sse = jnp.sum(e * e)
    loo_e = e / omh
    # Rounding can push SSE_(i) a hair below zero when example i carries the whole SSE.
    return undefined, omh, sse, loo_e, jnp.maximum(sse - e * loo_e, 0)


@functools.partial(jax.jit, static_argnames=("n", "r", "eps"))
def _influence_stats(h, e, Z, W, beta, n, r, eps):
    undefined, omh, sse, loo_e, sse_loo = _loo_basics(h, e, eps)
    s2 = sse / (n - r)
    s2_loo = sse_loo / (n - r - 1)
    t_int = e / jnp.sqrt(s2 * omh)
    t_ext = e / jnp.sqrt(s2_loo * omh)
    ratio = h / omh
    # (X^T X)^+ x_i in original coordinates is scale * (W z_i); the scale cancels in DFBETAS.
    wnorm = jnp.sqrt(jnp.sum(W * W, axis=1))
    c = loo_e / jnp.sqrt(s2_loo)
    dfbetas = jnp.matmul(Z, W.T, precision=_HI) * c[:, None] / wnorm[None, :]
    return Influence(
        beta=beta,
        residuals=e,
        leverage=h,
        sigma2=s2,
        sigma2_loo=s2_loo,
        loo_residuals=loo_e,
        press=jnp.sum(loo_e * loo_e),
        studentized_internal=t_int,
        studentized_external=t_ext,
        cooks_distance=t_int**2 / r * ratio,
        dffits=t_ext * jnp.sqrt(ratio),
        dfbetas=dfbetas,
        undefined=undefined,
        rank=r,
    )


@functools.partial(jax.jit, static_argnames=("n", "r", "eps", "predictive", "variance"))
def _regression_ratio(h, e, n, r, eps, predictive, variance):
    undefined, omh, sse, loo_e, sse_loo = _loo_basics(h, e, eps)
    if predictive == "plugin":
        d_in, d_out = (n, n - 1) if variance == "ml" else (n - r, n - 1 - r)
        lp_in = _log_normal(e, sse / d_in)
        lp_out = _log_normal(loo_e, sse_loo / d_out)
    else:
        lp_in = _log_student_t(e, sse / (n - r) * (1 + h), n - r)
        lp_out = _log_student_t(loo_e, sse_loo / (n - 1 - r) / omh, n - 1 - r)
    return LooDensityRatio(lp_in, lp_out, lp_in - lp_out, h, undefined)


@functools.partial(jax.jit, static_argnames=("n", "k", "eps"))
def _gaussian_ratio(d, logdet, n, k, eps):
    h = 1 / n + d
    omh = 1 - h
    undefined = omh <= math.sqrt(eps)
    one_m_cd = jnp.where(undefined, jnp.nan, n * omh / (n - 1))  # 1 - n d / (n - 1)
    const = -0.5 * k * math.log(2 * math.pi)
    lp_in = const - 0.5 * (logdet - k * math.log(n)) - 0.5 * n * d
    lp_out = (
        const
        - 0.5 * (logdet - k * math.log(n - 1) + jnp.log(one_m_cd))
        - 0.5 * n * n * d / ((n - 1) * one_m_cd)
    )
    return LooDensityRatio(lp_in, lp_out, lp_in - lp_out, h, undefined)


# In float32 the sums of squares of y and of its residuals (residuals ~1e-3 of y and
# below) under- or overflow outside these magnitudes of y (float32 spans ~1e-38..3e38).
_Y_RANGE_F32 = (2.0**-50, 2.0**50)


def _regression_rows(p: int) -> tuple[int, str]:
    """The regression's row count that holds whatever the rank: ``n >= rank + 2`` needs
    ``n >= 3`` (rank >= 1); ``n`` against the rank itself is checked after factoring."""
    return 3, " (n >= rank + 2: the leave-one-out residual variances need 2 residual degrees of freedom)"


def _fit(X, y, method, rcond, mesh, dt) -> _Fit:
    X = _as_design(X, dt, rows=_regression_rows)
    y = _as_target(y, X.shape[0], dt)
    top = float(jnp.max(jnp.abs(y))) if dt == np.float32 else 0.0  # float64 spans y's of any size
    if top and not _Y_RANGE_F32[0] <= top <= _Y_RANGE_F32[1]:
        raise ValueError(
            f"y's largest magnitude is {top:.3g}: in float32 (the default) the sums of squares of y and "
            f"of its residuals {'underflow' if top < 1 else 'overflow'} (float32 spans ~1e-38..3e38); "
            "scale y by a power of ten (beta, the residuals and the variances scale with it, every other "
            "statistic and the density ratio M do not), or use dtype=jnp.float64")
    f, Xty = _factor(X, y, method, rcond, mesh, dt)
    n, p = X.shape
    if n - f.rank < 2:
        of = f" (of p={p} columns)" if f.rank < p else ""
        raise ValueError(
            f"X has n={n} rows and rank {f.rank}{of}; this needs n >= rank + 2 = {f.rank + 2} (the "
            f"fit without one row keeps n - 1 - rank residual degrees of freedom, and its residual "
            f"variance needs at least 1)"
        )
    if f.Z is not None:  # QR
        Z = f.Z
        h, e, beta = _qr_fit(Z, y, f.W, f.scale)
    else:
        beta_s, beta = _gram_coef(Xty, f.W, f.pre, f.scale)
        if mesh is None:
            h, Z, e = _rows_fit_jit((X, y), (f.pre, f.scale, f.W, beta_s))
        else:
            h, Z, e = _rows_fit_sharded(X, y, f.pre, f.scale, f.W, beta_s, mesh)
    rss, yy = _check_not_exact(e, y, dt)
    _warn_if_imprecise(h, e, rss, yy, n - f.rank, dt, f.kappa if f.Z is None else float("nan"))
    return _Fit(n, f.rank, h, e, Z, f.W, beta)


# An exact fit (y constant, or an exact linear function of X's columns) leaves residuals
# that are pure rounding noise; every statistic scaled by s^2 is then 0/0 (each row gets
# t_i = 1, the same Cook's distance, ...). The rounding in e = y - X beta is relative to |y|
# (not to y - mean(y), which is 0 for a constant y): a backward-stable fit leaves
# |e_i| ~ a few eps |y_i| (measured on exact fits with well-conditioned X, n up to 1e5:
# ||e|| <= ~20 eps ||y||, float32 and float64). The test
#     ||e|| <= 100 * eps * ||y||,  i.e.  RSS <= (100 eps)^2 * sum(y^2),
# leaves headroom for mild ill-conditioning and accumulation. It has no factor n (float32
# sums are pairwise: an n-dependent bound would refuse, at n = 1e5, y = 1000 + noise of
# sd 0.1, whose float32 s^2 is accurate). Below it the residuals are within ~100 roundings
# of y (relative 1.2e-5 in float32, 2.2e-14 in float64): s^2 keeps at most a digit or two,
# so a genuine but that small residual (y = 1000 + noise of sd 0.01) is refused too, with
# the hint to compute in float64. Not caught: exact fits with larger rounding noise
# (strongly ill-conditioned X; float64 sums of n >= 1e4 equal values on CPU, ~0.03 n eps).
_EXACT_FIT_C = 100.0


def _check_not_exact(e: jax.Array, y: jax.Array, dt: np.dtype) -> tuple[float, float]:
    """``(RSS, sum y^2)``; raises where ``y`` is fitted exactly (see above)."""
    rss, yy = (float(v) for v in _sum_squares(e, y))
    tol = _EXACT_FIT_C * float(np.finfo(dt).eps)
    if rss <= tol * tol * yy:
        hint = ("; if y is not exactly linear, its residuals are below float32's resolution: compute "
                "in float64 (dtype=jnp.float64)") if dt != np.float64 else ""
        raise ValueError(
            f"y is fitted exactly by X (constant, or an exact linear function of X's columns): "
            f"residual variance 0 up to rounding (sum of squared residuals {rss:.3g} <= "
            f"({tol:.2g})^2 * sum(y^2) = {tol * tol * yy:.3g}), so studentized residuals, Cook's "
            f"distance, DFFITS and the leave-one-out density ratio are undefined{hint}"
        )
    return rss, yy


@jax.jit
def _sum_squares(e, y):
    return jnp.sum(e * e), jnp.sum(y * y)


# The leave-one-out statistics rest on SSE_(i) = SSE - e_i^2 / (1 - h_i), a difference
# that cancels where example i carries most of the SSE (few residual degrees of freedom,
# n close to p, or one gross outlier): rounding errors in h_i and e_i (of the fit itself,
# ~10-1000 eps where 1 - h_i is small) come back amplified by A_i = SSE / SSE_(i); and
# residuals far below y (||y|| / ||e|| = R) carry a relative rounding error ~eps R. Their
# estimate of the relative error of SSE_(i), and so of M_i, s_(i)^2, the externally
# studentized residual, DFFITS and DFBETAS of row i:
#     err_i ~ eps * A_i * (1000 + 10 R).
# Calibrated against float64 on 135 random problems (n - p from 2 to 2000, column scales
# 1 to 1e3, near-constant columns, y offsets of 1e3 over noise of 1e-3 to 1e2, both
# methods), err_i > 3e-3 flagged every problem whose float32 M was off by more than 1%
# of (1 + |M|) (24 of 24), with no miss; of the 48 it flagged, half were off by 1e-4 to
# 1e-2 only (the estimate is an upper-side one). Warned, not refused: float64 is the cure.
# On the Cholesky path the residuals themselves err by up to ~eps kappa^2 ||y|| (normal
# equations; kappa of the equilibrated X), a relative error ~eps kappa^2 R that reaches every
# statistic of every row. That bound is a worst case (it is reached where y leans on X's
# weakest direction); measured on a Unix-timestamp column beside an intercept (kappa 2.4e7
# in float64, eps kappa^2 R = 1.9) the residuals were off by 0.41 of their rms and the
# externally studentized residuals by 0.37 of 1 + |t|, so the estimate there is
#     err_i ~ A_i * (eps * (1000 + 10 R) + _CHOL_RESIDUAL * eps * kappa^2 * R)
# with _CHOL_RESIDUAL = 0.2 (the full bound would warn on float32 stackloss, kappa 50,
# whose statistics agree with float64 to 1e-3). method='qr' (error ~eps kappa) is the cure.
_IMPRECISE_AT = 3e-3
_CHOL_RESIDUAL = 0.2


@functools.partial(jax.jit, static_argnames=("eps",))
def _loo_amplification(h, e, eps):
    """``A_i = SSE / SSE_(i)`` ``[n]`` (inf where ``SSE_(i) <= 0``; 0 where undefined)."""
    undefined, _, sse, loo_e, sse_loo = _loo_basics(h, e, eps)
    amp = jnp.where(sse_loo > 0, sse / jnp.where(sse_loo > 0, sse_loo, 1), jnp.inf)
    return jnp.where(undefined, 0.0, amp)


def _warn_if_imprecise(
    h: jax.Array, e: jax.Array, rss: float, yy: float, dof: int, dt: np.dtype, kappa: float
) -> None:
    """Warn naming the rows whose LOO statistics may err by more than ``_IMPRECISE_AT``;
    ``kappa``: condition number of the Cholesky path (nan on the QR path)."""
    eps = float(np.finfo(dt).eps)
    r = math.sqrt(yy / rss)
    chol = _CHOL_RESIDUAL * eps * kappa**2 * r if math.isfinite(kappa) else 0.0  # rel. error of e
    amp = np.asarray(_loo_amplification(h, e, eps), dtype=np.float64)
    err = amp * (eps * (1000 + 10 * r) + chol)
    rows = np.flatnonzero(err > _IMPRECISE_AT)
    if not rows.size:
        return
    shown = _index_list(rows, 5)
    hint = "compute in float64 (dtype=jnp.float64)" if dt != np.float64 else "the data are at float64's limits"
    if chol > _IMPRECISE_AT:
        hint = (f"X is ill-conditioned for the Cholesky path (condition number {kappa:.3g} after column "
                f"equilibration): its residuals, and so every statistic of every row (studentized residuals, "
                f"Cook's distance, M), carry relative errors up to ~{chol:.2g}; "
                f"use method='qr'" + (" or dtype=jnp.float64" if dt != np.float64 else ""))
    _warn.warn(
        f"leave-one-out statistics of {rows.size} row(s) ({shown}) may carry relative errors up to "
        f"~{float(err.max()):.0e} from rounding in {np.dtype(dt).name}: SSE_(i) = SSE - e_i^2/(1 - h_i) cancels "
        f"(SSE / SSE_(i) up to {float(amp.max()):.3g}: n - rank = {dof} residual degrees of freedom, or "
        f"one row carrying most of the SSE) and/or the residuals are small against y "
        f"(||y|| / ||e|| = {r:.3g}); affected: M (loo_log_density_ratio_regression), sigma2_loo, "
        f"studentized_external, DFFITS, DFBETAS of those rows; {hint}",
        RuntimeWarning)


def influence(
    X: Any,
    y: Any,
    *,
    method: str = "cholesky",
    rcond: float | None = None,
    dtype: Any = None,
    mesh: Mesh | None = None,
) -> Influence:
    r"""OLS of ``y`` on ``X`` and its leave-one-out diagnostics, all closed form.

    With residuals :math:`e`, leverages :math:`h`, rank :math:`r` and
    :math:`s^2 = \sum_i e_i^2 / (n - r)`:

    .. math::
       e_{(i)} = \frac{e_i}{1 - h_i}, \quad
       s_{(i)}^2 = \frac{(n - r) s^2 - e_i^2 / (1 - h_i)}{n - r - 1}, \quad
       t_i = \frac{e_i}{s \sqrt{1 - h_i}}, \quad t^*_i = \frac{e_i}{s_{(i)} \sqrt{1 - h_i}},

       D_i = \frac{t_i^2}{r} \frac{h_i}{1 - h_i}, \quad
       \mathrm{DFFITS}_i = t^*_i \sqrt{\frac{h_i}{1 - h_i}}, \quad
       \mathrm{DFBETAS}_{ij} = \frac{[(X^\top X)^+ x_i]_j \, e_i / (1 - h_i)}
                                     {s_{(i)} \sqrt{[(X^\top X)^+]_{jj}}}.

    These are exactly what ``n`` refits without example ``i`` would give (Sherman–Morrison),
    at the cost of one fit. For a rank-deficient ``X``, :math:`(X^\top X)^+` above is
    :math:`D (D X^\top X D)^+ D` with :math:`D` the column equilibration (the minimum-norm
    solution in equilibrated coordinates): ``beta`` and DFBETAS are then those of refits in
    those coordinates and depend on the columns' scales, so they differ from statsmodels'
    (plain pseudo-inverse); ``h``, residuals, ``t`` and DFFITS do not depend on the
    choice and agree with it. Cook's distance divides by the rank ``r`` (as R's
    ``cooks.distance`` does); statsmodels divides by the column count ``p``, so for a
    rank-deficient ``X`` its value is ``r / p`` times this one. Conventions (precision,
    rank, ``h_i = 1`` rows) are in the module docstring; with ``mesh`` (Cholesky only)
    the Gram matrix is psum-ed over the mesh and the row-wise work runs on each shard.

    Args:
      X: ``[n, p]`` design (include a column of ones for an intercept), ``n >= r + 2`` for
        its rank ``r`` (``r = p`` at full rank; checked after factoring).
      y: ``[n]`` response.
      method: ``"cholesky"`` or ``"qr"``.
      rcond: rank tolerance (see :func:`leverage`).
      dtype: ``None`` (float32) or ``jnp.float64``.
      mesh: optional 1-D mesh to shard the rows over.

    Returns:
      An :class:`Influence`.

    Raises:
      ValueError: bad shapes, non-finite entries (index named), ``n - rank < 2``, ``rcond``
        not in ``[0, 1)``, or ``y`` fitted exactly (constant, or an exact linear function of
        ``X``'s columns: :math:`SSE \le (100 \epsilon)^2 \sum_i y_i^2`), where the
        residual variance is 0 up to rounding and every statistic above is ``0/0``; in
        float32, a ``y`` whose largest magnitude is outside ``2^-50 .. 2^50`` (its sums of
        squares would under- or overflow: scale it, or use float64).
        :func:`leverage`, which needs no ``y``, still works for such data.

    Warns:
      RuntimeWarning: rows whose leave-one-out statistics (``sigma2_loo``,
        ``studentized_external``, ``dffits``, ``dfbetas``) may have lost more than ~3e-3
        of relative precision to rounding, named: :math:`SSE_{(i)} = SSE - e_i^2/(1-h_i)`
        cancels when ``n - rank`` is small or one row carries most of the SSE, and
        residuals far below ``y`` are imprecise in float32; use float64 there. On the
        Cholesky path it also counts the residuals' error ~ :math:`\epsilon \kappa^2 \|y\|`
        (every row, every statistic; use ``method="qr"``). Also the rank cut and the
        ill-conditioning warning of :func:`leverage`.

    Examples:
      >>> import numpy as np, jaxmem.linear as jl
      >>> X = np.c_[np.ones(6), np.arange(6.0)]; y = np.array([0.1, 0.9, 2.2, 2.8, 4.1, 10])
      >>> inf = jl.influence(X, y, dtype=np.float64)
      >>> int(np.argmax(np.abs(np.asarray(inf.studentized_external))))
      5
    """
    dt = _compute_dtype(dtype)
    mesh = _check_method(method, mesh)
    _check_rcond(rcond)
    with _precision(dt):
        f = _fit(X, y, method, rcond, mesh, dt)
        out = _influence_stats(f.h, f.e, f.Z, f.W, f.beta, f.n, f.rank, float(np.finfo(dt).eps))
        return out._replace(rank=f.rank)  # jit returned it as an array


def _log_normal(r, var):
    return -0.5 * (jnp.log(2 * jnp.pi * var) + r * r / var)


def _log_student_t(r, scale2, nu):
    lg = jax.scipy.special.gammaln
    return (
        lg((nu + 1) / 2)
        - lg(nu / 2)
        - 0.5 * jnp.log(nu * jnp.pi * scale2)
        - (nu + 1) / 2 * jnp.log1p(r * r / (nu * scale2))
    )


def loo_log_density_ratio_regression(
    X: Any,
    y: Any,
    *,
    predictive: str = "plugin",
    variance: str = "ml",
    method: str = "cholesky",
    rcond: float | None = None,
    dtype: Any = None,
    mesh: Mesh | None = None,
) -> LooDensityRatio:
    r"""Memorization score of Gaussian linear regression of ``y`` on ``X``, in closed form.

    :math:`M_i = \log p(y_i \mid x_i, D) - \log p(y_i \mid x_i, D \setminus \{i\})` in nats.
    With residual :math:`e_i`, leverage :math:`h_i`, rank :math:`r`, :math:`SSE = \sum e^2`,
    the LOO residual is :math:`y_i - x_i^\top\hat\beta_{(i)} = e_i / (1 - h_i)` and
    :math:`SSE_{(i)} = SSE - e_i^2 / (1 - h_i)`. Two predictive densities:

    ``predictive="plugin"`` — the fitted Gaussian, :math:`N(y; x^\top\hat\beta, \hat\sigma^2)`,
    with :math:`\hat\sigma^2` refitted on each data set:

    .. math::
       \log p_{in} = \log N\!\left(e_i; 0, \hat\sigma^2\right),\quad
       \log p_{out} = \log N\!\left(\tfrac{e_i}{1 - h_i}; 0, \hat\sigma^2_{(i)}\right),

    ``variance="ml"``: :math:`\hat\sigma^2 = SSE/n`, :math:`\hat\sigma^2_{(i)} = SSE_{(i)}/(n-1)`
    (maximum likelihood on D and on D without i); ``variance="unbiased"``:
    :math:`s^2 = SSE/(n-r)`, :math:`s_{(i)}^2 = SSE_{(i)}/(n-1-r)`.

    ``predictive="posterior"`` — the posterior predictive under the flat prior
    :math:`p(\beta, \sigma^2) \propto 1/\sigma^2`, a Student-t
    :math:`t_\nu(y; x^\top\hat\beta, s^2 (1 + x^\top (X^\top X)^{-1} x))`. In sample
    :math:`x_i^\top (X^\top X)^{-1} x_i = h_i`; for the LOO model :math:`x_i` is a new point
    whose leverage relative to :math:`D \setminus \{i\}` is :math:`h_i / (1 - h_i)`, so

    .. math::
       \log p_{in} = \log t_{n-r}\!\left(e_i; 0, s^2 (1 + h_i)\right),\quad
       \log p_{out} = \log t_{n-1-r}\!\left(\tfrac{e_i}{1-h_i}; 0, \tfrac{s_{(i)}^2}{1 - h_i}\right).

    Args:
      X: ``[n, p]`` design, ``n >= r + 2`` for its rank ``r`` (as :func:`influence`).
      y: ``[n]`` response.
      predictive: ``"plugin"`` or ``"posterior"``.
      variance: ``"ml"`` or ``"unbiased"`` (plug-in only; the posterior uses ``s^2``).
      method, rcond, dtype, mesh: as in :func:`influence`.

    Returns:
      A :class:`LooDensityRatio`; ``score`` is ``M`` in nats per example.

    Raises:
      ValueError: bad arguments or ``y`` fitted exactly (as :func:`influence`), or an unknown
        predictive/variance.

    Warns:
      RuntimeWarning: as :func:`influence`, naming the rows whose ``M`` may carry relative
        errors above ~3e-3 from rounding (e.g. float32 with ``n = p + 2``, where it can be
        off by percents: use ``dtype=jnp.float64``).
    """
    if predictive not in ("plugin", "posterior"):
        raise ValueError(f"predictive must be 'plugin' or 'posterior', got {predictive!r}")
    if variance not in ("ml", "unbiased"):
        raise ValueError(f"variance must be 'ml' or 'unbiased', got {variance!r}")
    dt = _compute_dtype(dtype)
    mesh = _check_method(method, mesh)
    _check_rcond(rcond)
    with _precision(dt):
        f = _fit(X, y, method, rcond, mesh, dt)
        eps = float(np.finfo(dt).eps)
        return _regression_ratio(f.h, f.e, f.n, f.rank, eps, predictive, variance)


# The Gaussian score is a function of d_i = h_i - 1/n alone (log|S| cancels in M_i), and
# dM/dd = -c / (2 (1 - c d)) - n / 2 + n^2 / (2 (n - 1) (1 - c d)^2),  c = n / (n - 1),
# grows like 1 / (1 - h_i)^2 while M_i grows like 1 / (1 - h_i): the relative error of M_i
# is the relative error of d_i (of the leverage) amplified by ~1 / (1 - h_i). That error is
# ~eps kappa^2 on the Cholesky path and ~eps kappa on the QR path (kappa of the centred,
# equilibrated X), plus a floor of ~10 eps for the data's own rounding. The estimate
#     err_i = eps * (10 + kappa^a) * h_i * |dM/dd(d_i)| / (1 + |M_i|),  a = 2 (Cholesky), 1 (QR)
# was calibrated against float64 on 250 random float32 problems (n - k from 2 to 102, k 1..7,
# one row scaled up to 100x, near-collinear columns, column scales 1e-3..1e3, offsets
# up to 1e3 times the spread, both methods): err_i / (actual error relative to 1 + |M_i|)
# was >= 2 on every row whose actual error exceeded 1e-4, and err_i > 3e-3 flagged all 67
# rows off by more than 3e-3 (Cholesky; none were on QR), with no miss; of the ~380 flagged
# rows about 270 were off by less than 1e-3 (an upper-side estimate, like the regression's).
_GAUSS_FLOOR = 10.0


def _warn_if_gaussian_imprecise(r: LooDensityRatio, n: int, kappa: float, method: str, dt: np.dtype) -> None:
    """Warn naming the rows whose Gaussian ``M_i`` may err by more than ``_IMPRECISE_AT``."""
    eps = float(np.finfo(dt).eps)
    h = np.asarray(r.leverage, dtype=np.float64)
    m = np.asarray(r.score, dtype=np.float64)
    c = n / (n - 1)
    with np.errstate(all="ignore"):
        omc = 1 - c * (h - 1 / n)  # 1 - c d_i = n (1 - h_i) / (n - 1)
        slope = np.abs(-0.5 * c / omc - 0.5 * n + 0.5 * n * n / ((n - 1) * omc**2))
        loss = eps * (_GAUSS_FLOOR + (kappa if method == "qr" else kappa**2))
        err = loss * h * slope / (1 + np.abs(m))
    err = np.where(np.asarray(r.undefined) | ~np.isfinite(err), 0.0, err)
    rows = np.flatnonzero(err > _IMPRECISE_AT)
    if not rows.size:
        return
    shown = _index_list(rows, 5)
    if dt != np.float64:
        cure = "use dtype=jnp.float64" + (" (method='qr' in float32 helps but may not suffice)"
                                          if method != "qr" else "")
    else:
        cure = "use method='qr'" if method != "qr" else "the data are at float64's limits"
    grows = "eps * kappa^2 on the Cholesky path" if method != "qr" else "eps * kappa on the QR path"
    _warn.warn(
        f"the scores M of {rows.size} row(s) ({shown}) may carry relative errors up to ~{float(err.max()):.0e} "
        f"from rounding in {np.dtype(dt).name}: M_i grows like 1 / (1 - h_i) (h_i up to "
        f"{float(h[rows].max()):.6g} there), which multiplies the leverage's relative error (~{grows}; "
        f"condition number {kappa:.3g} of the centred X after column equilibration); {cure}",
        RuntimeWarning)


def _gaussian_rows(k: int) -> tuple[int, str]:
    return k + 2, (f" (the n - 1 rows left when one is removed span at most n - 2 directions once "
                   f"centred, fewer than the {k} dimensions when n < {k + 2}: every leave-one-out "
                   f"covariance would be singular)")


def loo_log_density_ratio_gaussian(
    X: Any,
    *,
    method: str = "cholesky",
    dtype: Any = None,
    mesh: Mesh | None = None,
) -> LooDensityRatio:
    r"""Memorization score of a multivariate Gaussian fitted by maximum likelihood, closed form.

    The density is :math:`N(x; \mu, \Sigma)` with :math:`\mu = \bar x`,
    :math:`\Sigma = S / n`, :math:`S = \sum_j (x_j - \bar x)(x_j - \bar x)^\top` (the scatter
    matrix). Without example ``i`` the fit follows from rank-one updates:
    :math:`\mu_{(i)} = \mu - \delta_i / (n - 1)`, :math:`S_{(i)} = S - c\,\delta_i\delta_i^\top`
    with :math:`\delta_i = x_i - \bar x`, :math:`c = n / (n - 1)`. With
    :math:`d_i = \delta_i^\top S^{-1} \delta_i` the matrix determinant lemma and
    Sherman–Morrison give

    .. math::
       \log p_{in} = -\tfrac{k}{2}\log 2\pi - \tfrac12 \log|S/n| - \tfrac{n}{2} d_i,\qquad
       \log p_{out} = -\tfrac{k}{2}\log 2\pi - \tfrac12 \log|S/(n-1)|
          - \tfrac12 \log(1 - c d_i) - \tfrac{n^2 d_i}{2 (n - 1)(1 - c d_i)},

    (``k`` the dimension) so :math:`M_i` is a function of :math:`d_i` alone, and
    :math:`h_i = 1/n + d_i` is the leverage of the design ``[1, X]``
    (:math:`1 - c d_i = n (1 - h_i) / (n - 1)`).

    Args:
      X: ``[n, k]`` observations, ``n >= k + 2`` (so that every :math:`S_{(i)}` can be
        nonsingular).
      method: ``"cholesky"`` or ``"qr"`` (of the centred ``X``).
      dtype: ``None`` (float32) or ``jnp.float64``.
      mesh: optional 1-D mesh to shard the rows over (Cholesky only).

    Returns:
      A :class:`LooDensityRatio`: log-densities in nats, ``leverage`` is :math:`h_i`.

    Raises:
      ValueError: bad shapes or values, ``n < k + 2``, or a singular covariance (rank of the
        centred ``X`` below ``k`` at the default tolerance): a Gaussian fitted to it has no
        density.

    Warns:
      RuntimeWarning: naming the rows whose ``score`` may carry relative errors above ~3e-3
        from rounding. :math:`M_i` grows like :math:`1/(1 - h_i)`, so the leverage's relative
        error (~:math:`\epsilon\kappa^2` on the Cholesky path, ~:math:`\epsilon\kappa` on
        the QR path, :math:`\kappa` of the centred, column-equilibrated ``X``) comes back
        multiplied by about :math:`1/(1 - h_i)`: in float32 with ``n`` close to ``k`` a row
        with ``h = 0.998`` can be off by percents at :math:`\kappa \approx 100`. Use
        ``dtype=jnp.float64`` there (``method="qr"`` reduces the error in float32). The
        estimate is upper-side (calibrated so that no row off by more than 3e-3 went
        unnamed; most named rows are off by less). Also the ill-conditioning warning of
        :func:`leverage`.
    """
    dt = _compute_dtype(dtype)
    mesh = _check_method(method, mesh)
    if isinstance(X, np.ndarray) and X.ndim == 2 and X.shape[0] > 0 \
            and (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)) \
            and (dt == np.float32 or X.dtype.itemsize > dt.itemsize) and np.all(np.isfinite(X)):
        # The score is translation invariant: centre on the host in float64 (or the input's
        # wider precision) before rounding to dt. Float32 data around 1e6 lose their spread
        # to rounding otherwise (0.2 nats); a float32 or integer array with a large mean
        # against its spread (an offset 1e4 times the spread) lost ~10% of M on n = k + 2.
        Xh = X.astype(np.promote_types(X.dtype, np.float64))
        X = Xh - Xh.mean(axis=0)
    with _precision(dt):
        X = _as_design(X, dt, rows=_gaussian_rows)
        n, k = X.shape
        if not bool(_all_finite(X)):
            _raise_nonfinite("X", X)
        Xc = _center(X)
        f, _ = _factor(Xc, None, method, None, mesh, dt)
        if f.rank < k:
            raise ValueError(
                f"the covariance of X is singular (rank {f.rank} < {k} after centring): "
                "a Gaussian fitted to it has no density; drop redundant columns"
            )
        d = _leverage_of(Xc, f, mesh)  # d_i: leverage of the centred rows
        out = _gaussian_ratio(d, f.logdet, n, k, float(np.finfo(dt).eps))
        _warn_if_gaussian_imprecise(out, n, f.kappa, method, dt)
        return out
