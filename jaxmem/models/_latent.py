"""Shared machinery of the models: ELBO, importance weights, keys, layers, input checks.

A subclass supplies three pieces:

- ``preprocess(x, keys) -> x``: evaluation/training-time input transform (dynamic
  binarisation, dequantisation), one key per example;
- ``encode(x) -> (mean, scale)``: the Gaussian encoder q(z|x); ``scale`` is either the
  diagonal standard deviations ``[B, L]`` or a lower-triangular Cholesky factor
  ``[B, L, L]`` (full covariance);
- ``log_likelihood(x, z) -> [B, S]``: the decoder's log p(x|z) for ``z`` of shape
  ``[B, S, L]``.

Everything else — the importance weights ``log p(x, z) - log q(z|x)``, the
importance-weighted estimate of log p(x), the ELBO, the training loss — is written once
here, with the reparameterisation ``z = mean + scale @ eps``, ``eps ~ N(0, I)``, for which
``log q(z|x) = log N(eps; 0, I) - log|det scale|`` whatever the form of ``scale``.

Randomness contract (docs/CONTRACTS.md): at evaluation, example ``b`` gets one key
``keys[b]``. From it, preprocessing noise is drawn with ``fold_in(keys[b], 0)`` and the
noise of importance sample ``s`` with ``fold_in(fold_in(keys[b], 1), s)``. Sample ``s``
of an example is therefore the same number whether the samples are drawn all at once or
in chunks of any size, and whichever chunk or device the example lands in. Every random
number (noise, binarisation and dequantisation uniforms, in training too) is drawn in
float32 whatever ``jax_enable_x64`` says, then promoted where the data or parameters are
float64: the same key gives the same draws with x64 on or off.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from jaxmem import _warn

LOG_2PI = math.log(2.0 * math.pi)

# Sub-streams of a per-example key (see the module docstring).
_PREPROCESS_STREAM = 0
_SAMPLE_STREAM = 1

@jax.custom_jvp
def softplus(x: jax.Array) -> jax.Array:
    """``log(1 + exp(x))``, elementwise, as ``max(x, 0) + log1p(exp(-|x|))``.

    The same values as ``jax.nn.softplus`` (``logaddexp(x, 0)``) to float rounding
    (``tests/test_models.py`` checks it against float64, with its infinities and its
    derivative, the sigmoid), but faster on a CPU: a Bernoulli decoder's
    ``sum(x * l - softplus(l))`` over a ``[2048, 1024]`` block of logits took 1.9 ms
    against 5.7 ms, and XLA then fused the whole MLP decoder and that sum into one
    kernel (``benchmarks/RESULTS.md``, likelihood).
    """
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


# The derivative is the sigmoid everywhere; differentiating the formula above through
# maximum and abs would give 0 instead of 1/2 at x = 0.
softplus.defjvps(lambda g, ans, x: g * jax.nn.sigmoid(x))


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
    "softplus": softplus,
    "elu": jax.nn.elu,
}


def activation_fn(name: str):
    """The activation function called ``name`` (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def mlp_layers(sizes: Sequence[int], rngs: nnx.Rngs) -> nnx.List:
    """Dense layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``, for :func:`run_layers`."""
    return nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])


@jax.custom_vjp
def dense(h: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``h @ kernel + bias`` for ``h [..., in]``, ``kernel [in, out]``, ``bias [out]``.

    The same numbers as ``nnx.Linear`` (default precision), with a hand-written backward
    pass whose kernel gradient ``h^T g`` comes out of the matmul as ``[in, out]``, the
    kernel's own layout. Differentiating the plain product makes XLA compute it as
    ``[out, in]`` and transpose it inside every optimizer-update fusion that reads it
    (Adam's two moments), a strided read of the whole gradient; on a CPU those
    transposed reads were the largest cost of a training step. Reverse mode only, so
    :func:`run_layers` uses it only inside :func:`reverse_mode_dense`.
    """
    return jnp.matmul(h, kernel) + bias


def _dense_fwd(h, kernel, bias):
    return dense(h, kernel, bias), (h, kernel, bias)


def _dense_bwd(res, g):
    h, kernel, bias = res
    h2, g2 = h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1])
    d_kernel = jax.lax.dot_general(h2, g2, (((0,), (0,)), ((), ())))  # [in, out]
    # (kernel g^T)^T rather than g kernel^T: XLA's CPU matmuls take their right operand
    # contracted on its first axis, so the latter copies a transposed kernel every step;
    # this form transposes the [batch, out] and [in, batch] activations instead.
    d_h = jax.lax.dot_general(kernel, g2, (((1,), (1,)), ((), ()))).T.reshape(h.shape)
    # Each cotangent in its primal's dtype, as autodiff gives them: with x64 on, float64
    # data (or a float64 layer below) makes g float64, and float32 parameters must still
    # get float32 gradients (an optimizer state of another dtype breaks the scanned epoch).
    return d_h.astype(h.dtype), d_kernel.astype(kernel.dtype), g2.sum(0).astype(bias.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


_REVERSE_MODE_DENSE = contextvars.ContextVar("jaxmem_reverse_mode_dense", default=False)


@contextlib.contextmanager
def reverse_mode_dense() -> Iterator[None]:
    """While tracing inside this context, :func:`run_layers` computes ``nnx.Linear`` layers
    with :func:`dense`, whose hand-written backward pass is faster on CPUs but supports
    reverse-mode differentiation only. ``jaxmem.ensemble`` traces its training step in it;
    everywhere else the layers stay plain ``nnx.Linear`` calls (forward mode, ``jax.jvp``,
    forward-over-reverse Hessian-vector products all work). Values are the same either way.
    """
    token = _REVERSE_MODE_DENSE.set(True)
    try:
        yield
    finally:
        _REVERSE_MODE_DENSE.reset(token)


#: What :func:`matmul_dtype` accepts, by name.
MATMUL_DTYPES = ("float32", "bfloat16")

_MATMUL_DTYPE = contextvars.ContextVar("jaxmem_matmul_dtype", default=None)


def check_matmul_dtype(dtype) -> str:
    """``dtype`` (a name, a numpy/JAX dtype, or None for float32) as a name of :data:`MATMUL_DTYPES`."""
    if dtype is None:
        return "float32"
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES} (or None), got {dtype!r}")
    return name


#: CPU feature flags (``/proc/cpuinfo``) of instructions that multiply bf16 natively: x86's
#: AMX and AVX-512 BF16, Arm's BF16 and SME.
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16", "sme"})


@functools.lru_cache(maxsize=4)
def _cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU feature flags in ``path`` (x86 ``flags``, Arm ``Features``; None where it cannot be read)."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def cpu_multiplies_bf16() -> bool | None:
    """Whether this machine's CPU has bf16 multiply instructions (:data:`BF16_CPU_FLAGS`).

    None where its feature flags cannot be read (not Linux). Without them XLA converts
    bf16 operands back to float32 to multiply, so ``matmul_dtype="bfloat16"`` only adds
    rounding and conversions (measured 0.65-0.77x the float32 rate on AMD EPYCs, Zen 3,
    with XLA's default YNNPACK matmuls).
    """
    flags = _cpu_flags()
    return None if flags is None else bool(flags & BF16_CPU_FLAGS)


def warn_if_bf16_is_slow(name: str) -> None:
    """Warn when ``name`` is ``"bfloat16"`` and this process computes on a CPU known to lack bf16 units."""
    if name == "bfloat16" and jax.default_backend() == "cpu" and cpu_multiplies_bf16() is False:
        _warn.warn(
            "matmul_dtype='bfloat16' on a CPU without bf16 multiply instructions (none of "
            f"{sorted(BF16_CPU_FLAGS)} in /proc/cpuinfo): XLA multiplies in float32 after "
            "converting, so it runs slower than float32 and only adds bf16 rounding",
            UserWarning,
        )


@contextlib.contextmanager
def matmul_dtype(dtype) -> Iterator[None]:
    """While tracing inside this context, :func:`apply_layer` multiplies in ``dtype``.

    ``"bfloat16"``: each plain ``nnx.Linear`` layer run by :func:`apply_layer` (every layer
    of :class:`~jaxmem.models.MLPVAE` and :class:`~jaxmem.models.Classifier`, the dense
    layers of :class:`~jaxmem.models.ConvVAE`; not convolutions, nor the linear-Gaussian
    VAE's own parameters) rounds its input and kernel to bfloat16 (8 significant bits)
    and multiplies them with float32 accumulation (``preferred_element_type=float32``);
    the bias, activations and every reduction stay float32. CPUs with bf16 matrix units
    (Intel AMX, Arm SME/BF16) and every accelerator multiply bf16 several times faster
    than f32; CPUs without them (:func:`cpu_multiplies_bf16`) run it slower. ``"float32"`` or
    ``None``: the layers as they are. Scoring uses it through
    ``loglik_matrix(..., matmul_dtype=...)``, which states what it changes in the values.
    """
    name = check_matmul_dtype(dtype)
    token = _MATMUL_DTYPE.set(None if name == "float32" else jnp.dtype(name))
    try:
        yield
    finally:
        _MATMUL_DTYPE.reset(token)


def _plain_linear(layer) -> bool:
    """An ``nnx.Linear`` computing exactly ``h @ kernel + bias`` (so :func:`dense` may stand in)."""
    return (type(layer) is nnx.Linear and layer.use_bias and layer.dtype is None and layer.precision is None
            and layer.dot_general is jax.lax.dot_general)


def apply_layer(layer, h: jax.Array) -> jax.Array:
    """``layer(h)``, a plain ``nnx.Linear`` computed as :func:`matmul_dtype` and
    :func:`reverse_mode_dense` ask (any other layer is simply called)."""
    if not _plain_linear(layer):
        return layer(h)
    low = _MATMUL_DTYPE.get()
    if low is not None:
        kernel = layer.kernel[...]
        out = jnp.matmul(h.astype(low), kernel.astype(low), preferred_element_type=jnp.float32)
        return out.astype(kernel.dtype) + layer.bias[...]
    if _REVERSE_MODE_DENSE.get():
        return dense(h, layer.kernel[...], layer.bias[...])
    return layer(h)


def run_layers(layers: nnx.List, h: jax.Array, act) -> jax.Array:
    """Apply ``layers`` in turn (:func:`apply_layer`), ``act`` between them."""
    for i, layer in enumerate(layers):
        h = apply_layer(layer, h)
        if i < len(layers) - 1:
            h = act(h)
    return h


def std_normal_log_prob(z: jax.Array) -> jax.Array:
    """log N(z; 0, I) summed over the last axis (nats)."""
    return -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * z.shape[-1] * LOG_2PI


def logmeanexp(a: jax.Array, axis: int = -1) -> jax.Array:
    """log(mean(exp(a))) along ``axis``, computed stably."""
    return jax.nn.logsumexp(a, axis=axis) - math.log(a.shape[axis])


def preprocess_keys(keys: jax.Array) -> jax.Array:
    """Per-example keys for preprocessing noise, from the per-example keys ``[B]``."""
    return jax.vmap(lambda k: jax.random.fold_in(k, _PREPROCESS_STREAM))(keys)


def sample_noise(keys: jax.Array, sample_ids: jax.Array, latent_dim: int) -> jax.Array:
    """Standard normal noise, f32 ``[B, S, latent_dim]``, for samples ``sample_ids`` of each example.

    Sample ``s`` of example ``b`` is drawn from ``fold_in(fold_in(keys[b], 1), s)``, so it
    does not depend on which other samples are drawn with it. Always drawn in float32,
    whatever ``jax_enable_x64`` says: a float64 draw from the same key is another number,
    so the flag would change every estimate (see the module docstring).
    """

    def per_example(k):
        root = jax.random.fold_in(k, _SAMPLE_STREAM)
        return jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(root, s), (latent_dim,), jnp.float32))(
            sample_ids)

    return jax.vmap(per_example)(keys)


def check_batch(x: jax.Array, example_shape: tuple[int, ...], what: str) -> None:
    """Raise a clear error unless ``x`` has shape ``[B, *example_shape]``."""
    shape = tuple(getattr(x, "shape", ()))
    if shape[1:] != tuple(example_shape) or len(shape) != len(example_shape) + 1:
        raise ValueError(
            f"{what} expects a batch of shape [B, {', '.join(map(str, example_shape))}], got {shape}"
        )


def check_keys(keys: jax.Array, batch_size: int) -> None:
    """Raise a clear error unless ``keys`` holds one PRNG key per example."""
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        n = keys.shape[0] if keys.ndim == 1 else None
    else:  # raw uint32 keys [B, 2]
        n = keys.shape[0] if keys.ndim == 2 else None
    if n != batch_size:
        raise ValueError(
            f"keys must hold one PRNG key per example ({batch_size}), got shape {keys.shape}; "
            "derive them as jax.vmap(lambda i: jax.random.fold_in(key, i))(example_indices)"
        )


class LatentVariableModel(nnx.Module):
    """Base class of the VAEs: p(z) = N(0, I), Gaussian q(z|x), a decoder p(x|z).

    Subclasses set ``self.example_shape`` and ``self.latent_dim`` and implement
    ``preprocess``, ``encode`` and ``log_likelihood`` (see the module docstring).
    """

    example_shape: tuple[int, ...]
    latent_dim: int

    # -- to implement ----------------------------------------------------------------
    def preprocess(self, x: jax.Array, keys: jax.Array) -> jax.Array:
        """Input transform with one key per example; identity by default."""
        del keys
        return x

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def log_likelihood(self, x: jax.Array, z: jax.Array) -> jax.Array:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------
    @staticmethod
    def _log_det_scale(mean, scale) -> jax.Array:
        """``log |det scale|`` ``[B]`` (diagonal or triangular: the sum of log diagonal)."""
        diag = scale if scale.ndim == mean.ndim else jnp.diagonal(scale, axis1=-2, axis2=-1)
        return jnp.sum(jnp.log(diag), axis=-1)

    def _reparameterize(self, mean, scale, eps):
        """z = mean + scale @ eps and log q(z|x); eps ``[B, S, L]`` -> (z, log_q ``[B, S]``)."""
        if scale.ndim == mean.ndim:  # diagonal
            z = mean[:, None, :] + scale[:, None, :] * eps
        else:  # lower-triangular Cholesky factor [B, L, L]
            z = mean[:, None, :] + jnp.einsum("bij,bsj->bsi", scale, eps, precision="highest")
        return z, std_normal_log_prob(eps) - self._log_det_scale(mean, scale)[:, None]

    def prepare(self, batch: jax.Array, keys: jax.Array):
        """Preprocess and encode a batch once, before any importance samples are drawn.

        Args:
          batch: f32 ``[B, *example_shape]``.
          keys: PRNG keys ``[B]``, one per example.

        Returns:
          ``(x, (mean, scale))``: the preprocessed inputs and the encoder's q(z|x).
        """
        check_batch(batch, self.example_shape, type(self).__name__)
        check_keys(keys, batch.shape[0])
        x = self.preprocess(batch, preprocess_keys(keys))
        return x, self.encode(x)

    def log_weights(self, x, q, keys: jax.Array, sample_ids: jax.Array) -> jax.Array:
        """Importance log-weights ``log p(x, z_s) - log q(z_s|x)`` for samples ``sample_ids``.

        Args:
          x, q: the output of :meth:`prepare` for a batch of B examples.
          keys: PRNG keys ``[B]``, the same ones given to :meth:`prepare`.
          sample_ids: int32 ``[S]``, which importance samples to draw (see the module
            docstring: sample ``s`` is the same whichever others are drawn with it).

        Returns:
          f32 ``[B, S]``, nats.
        """
        mean, scale = q
        eps = sample_noise(keys, sample_ids, self.latent_dim)
        z, log_q = self._reparameterize(mean, scale, eps)
        return std_normal_log_prob(z) + self.log_likelihood(x, z) - log_q

    def log_prob(self, batch: ArrayLike, keys: jax.Array, num_samples: int) -> jax.Array:
        """Importance-weighted estimate of log p(x) with ``num_samples`` samples from q(z|x).

        .. math:: \\log \\frac{1}{S} \\sum_{s=1}^S \\frac{p(x, z_s)}{q(z_s | x)}, \\quad z_s \\sim q(z|x)

        A lower bound of log p(x) in expectation, tightening as S grows (Burda et al., 2016).

        Args:
          batch: f32 ``[B, *example_shape]``.
          keys: PRNG keys ``[B]``, one per example (``fold_in(base_key, example_index)``).
          num_samples: S, the number of importance samples.

        Returns:
          f32 ``[B]``, nats per example.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        x, q = self.prepare(batch, keys)
        return logmeanexp(self.log_weights(x, q, keys, jnp.arange(num_samples)), axis=-1)

    def elbo(self, batch: ArrayLike, keys: jax.Array, num_samples: int = 1) -> jax.Array:
        """Monte Carlo ELBO, the mean of ``num_samples`` importance log-weights (nats, ``[B]``).

        Uses the same samples as :meth:`log_prob` with the same keys, so
        ``log_prob >= elbo`` holds example by example (Jensen's inequality).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        x, q = self.prepare(batch, keys)
        return jnp.mean(self.log_weights(x, q, keys, jnp.arange(num_samples)), axis=-1)

    def loss(self, batch: ArrayLike, key: jax.Array) -> jax.Array:
        """Training loss per example: the negative ELBO (nats, ``[B]``).

        One reparameterised sample for the reconstruction term and the KL divergence to
        N(0, I) in closed form (lower variance than sampling it). ``key`` is one PRNG key
        for the whole batch; it seeds preprocessing and the sample.
        """
        check_batch(batch, self.example_shape, type(self).__name__)
        b = batch.shape[0]
        k_pre, k_eps = jax.random.split(key)
        x = self.preprocess(batch, jax.random.split(k_pre, b))
        mean, scale = self.encode(x)
        eps = jax.random.normal(k_eps, (b, 1, self.latent_dim), jnp.float32)  # as sample_noise
        z, _ = self._reparameterize(mean, scale, eps)
        recon = self.log_likelihood(x, z)[:, 0]
        # KL(N(mean, S S^T) || N(0, I)), tr(S S^T) = sum of squares of S's entries
        trace = jnp.sum((scale * scale).reshape(b, -1), axis=-1)
        log_det_cov = 2.0 * self._log_det_scale(mean, scale)
        kl = 0.5 * (trace + jnp.sum(mean * mean, axis=-1) - self.latent_dim - log_det_cov)
        return kl - recon
