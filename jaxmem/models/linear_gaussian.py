"""The linear-Gaussian VAE: a latent-variable model whose marginal likelihood is exact.

Generative model ``p(z) = N(0, I_k)``, ``p(x|z) = N(W z + b, sigma^2 I_d)``, so
``p(x) = N(x; b, W W^T + sigma^2 I)`` (probabilistic PCA, Tipping & Bishop, 1999), and
the posterior is Gaussian too:

.. math:: p(z|x) = N\\big(\\Sigma W^T (x - b) / \\sigma^2,\\ \\Sigma\\big), \\quad
          \\Sigma = (I + W^T W / \\sigma^2)^{-1}.

The encoder is amortised and linear with a full (shared) covariance,
``q(z|x) = N(A x + c, L L^T)``, a family that contains the true posterior: with
:meth:`LinearGaussianVAE.set_exact_posterior` every importance weight equals p(x)
exactly. This makes the model the oracle for the likelihood estimators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from jaxmem.models._latent import LOG_2PI, LatentVariableModel

__all__ = ["LinearGaussianVAE"]

_HI = jax.lax.Precision.HIGHEST  # the oracle must not lose digits to TF32 on GPUs


class LinearGaussianVAE(LatentVariableModel):
    """Linear-Gaussian VAE (probabilistic PCA with a linear Gaussian encoder).

    Parameters: decoder ``W [d, k]``, ``b [d]``, ``log_sigma []``; encoder
    ``A [k, d]``, ``c [k]`` and ``L_raw [k, k]`` (``L`` = strictly lower part of
    ``L_raw`` plus ``exp`` of its diagonal, a Cholesky factor).

    Args:
      example_shape: ``(d,)``.
      latent_dim: k.
      init_log_sigma: initial log of the observation noise standard deviation (used to
        initialise ``log_sigma`` only, not kept: models differing only in it stack).
      rngs: parameter initialisation.
    """

    def __init__(
        self,
        example_shape: Sequence[int],
        *,
        latent_dim: int = 2,
        init_log_sigma: float = 0.0,
        rngs: nnx.Rngs,
    ):
        example_shape = tuple(int(s) for s in example_shape)
        if len(example_shape) != 1:
            raise ValueError(f"LinearGaussianVAE needs example_shape (d,), got {example_shape}")
        d, k = example_shape[0], int(latent_dim)
        if k < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.example_shape = example_shape
        self.latent_dim = k
        # init_log_sigma is not kept as an attribute: attributes are the graphdef, and
        # models that differ only in where they started must share one (to be stacked).
        # float32 parameters whatever jax_enable_x64 says, as nnx.Linear's: the same seed
        # then gives the same model.
        f32 = jnp.float32
        self.W = nnx.Param(jax.random.normal(rngs.params(), (d, k), f32) / math.sqrt(k))
        self.b = nnx.Param(jnp.zeros((d,), f32))
        self.log_sigma = nnx.Param(jnp.asarray(float(init_log_sigma), f32))
        self.A = nnx.Param(0.1 * jax.random.normal(rngs.params(), (k, d), f32) / math.sqrt(d))
        self.c = nnx.Param(jnp.zeros((k,), f32))
        self.L_raw = nnx.Param(jnp.zeros((k, k), f32))

    # -- encoder / decoder -------------------------------------------------------------
    def _cholesky_q(self) -> jax.Array:
        raw = self.L_raw[...]
        return jnp.tril(raw, -1) + jnp.diag(jnp.exp(jnp.diagonal(raw)))

    def encode(self, x):
        mean = jnp.dot(x, self.A[...].T, precision=_HI) + self.c[...]
        scale = jnp.broadcast_to(self._cholesky_q(), (x.shape[0], self.latent_dim, self.latent_dim))
        return mean, scale

    def log_likelihood(self, x, z):
        d = self.example_shape[0]
        pred = jnp.einsum("bsk,dk->bsd", z, self.W[...], precision=_HI) + self.b[...]
        r = x[:, None, :] - pred
        sigma2 = jnp.exp(2.0 * self.log_sigma[...])
        return -0.5 * jnp.sum(r * r, axis=-1) / sigma2 - d * self.log_sigma[...] - 0.5 * d * LOG_2PI

    # -- closed forms ------------------------------------------------------------------
    def marginal_covariance(self) -> jax.Array:
        """``W W^T + sigma^2 I``, the covariance of p(x), ``[d, d]``."""
        w = self.W[...]
        d = self.example_shape[0]
        return jnp.dot(w, w.T, precision=_HI) + jnp.exp(2.0 * self.log_sigma[...]) * jnp.eye(d)

    def exact_log_prob(self, x: ArrayLike) -> jax.Array:
        """Exact ``log p(x) = log N(x; b, W W^T + sigma^2 I)``, through the k x k posterior.

        With ``G = W^T W + sigma^2 I_k`` (``sigma^2`` times the posterior precision) and
        the posterior mean ``mu = G^{-1} W^T (x - b)``, the Woodbury identity and the
        matrix determinant lemma give

        .. math::

            (x - b)^T C^{-1} (x - b) = \\|x - b - W \\mu\\|^2 / \\sigma^2 + \\|\\mu\\|^2, \\quad
            \\log\\det C = 2 (d - k) \\log\\sigma + \\log\\det G, \\quad C = W W^T + \\sigma^2 I_d.

        Only a k x k Cholesky factor is taken, and the quadratic form is minimal at
        ``mu``, so an error in ``mu`` changes it only to second order: for ``x`` away
        from the model's subspace the value keeps float32 accuracy (~1e-7 relative) even
        where ``W W^T`` dwarfs ``sigma^2`` (``sigma = 1e-3``, ``|W| ~ 100``), where a
        d x d Cholesky of ``C`` formed in float32 loses every digit, or gives NaN. For
        ``x`` near the subspace (data drawn from the model), the residual ``x - b - W mu``
        is a difference of float32 vectors of size ``|x - b|``, and the quadratic form
        is off by about ``eps * d * |x - b| * |residual| / sigma^2`` nats (float32 eps
        6e-8: 0.06 nats, 4.5%, at d = 5, ``sigma = 1e-3``, ``|W| ~ 100``): no float32
        computation does better, as the float32 input itself is that uncertain. Use
        x64 and float64 ``x`` there (agrees with a 50-digit reference to 1e-11).

        Args:
          x: f32 ``[B, d]``.

        Returns:
          f32 ``[B]``, nats per example. With x64 enabled and float64 ``x``, float64,
          computed in float64 throughout (the parameters are cast to it).
        """
        if x.ndim != 2 or x.shape[1] != self.example_shape[0]:
            raise ValueError(f"exact_log_prob expects [B, {self.example_shape[0]}], got {x.shape}")
        d, k = self.example_shape[0], self.latent_dim
        dtype = jnp.result_type(x.dtype, self.W[...].dtype)  # float64 only for float64 x under x64
        w, b, log_sigma = (p[...].astype(dtype) for p in (self.W, self.b, self.log_sigma))
        sigma2 = jnp.exp(2.0 * log_sigma)
        r = x.astype(dtype) - b  # [B, d]
        chol = jnp.linalg.cholesky(jnp.dot(w.T, w, precision=_HI) + sigma2 * jnp.eye(k, dtype=dtype))
        mu = jax.scipy.linalg.cho_solve((chol, True), jnp.dot(w.T, r.T, precision=_HI)).T  # [B, k]
        res = r - jnp.dot(mu, w.T, precision=_HI)
        maha = jnp.sum(res * res, axis=-1) / sigma2 + jnp.sum(mu * mu, axis=-1)
        log_det = 2.0 * (d - k) * log_sigma + 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
        return -0.5 * (maha + log_det + d * LOG_2PI)

    def exact_posterior(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The encoder parameters ``(A, c, L)`` for which q(z|x) = p(z|x) exactly.

        ``A = Sigma W^T / sigma^2``, ``c = -A b``, ``L = cholesky(Sigma)`` with
        ``Sigma = (I + W^T W / sigma^2)^{-1}``.
        """
        w = self.W[...]
        sigma2 = jnp.exp(2.0 * self.log_sigma[...])
        precision = jnp.eye(self.latent_dim) + jnp.dot(w.T, w, precision=_HI) / sigma2
        # Sigma = P^{-1}; with P = R R^T (Cholesky), Sigma = R^{-T} R^{-1}.
        r = jnp.linalg.cholesky(precision)
        r_inv = jax.scipy.linalg.solve_triangular(r, jnp.eye(self.latent_dim), lower=True)
        sigma = jnp.dot(r_inv.T, r_inv, precision=_HI)
        a = jnp.dot(sigma, w.T, precision=_HI) / sigma2
        c = -jnp.dot(a, self.b[...], precision=_HI)
        return a, c, jnp.linalg.cholesky(sigma)

    def set_exact_posterior(self) -> None:
        """Overwrite the encoder with the true posterior (in place): q(z|x) = p(z|x)."""
        a, c, chol = self.exact_posterior()
        self.A[...] = a
        self.c[...] = c
        self.L_raw[...] = jnp.tril(chol, -1) + jnp.diag(jnp.log(jnp.diagonal(chol)))
