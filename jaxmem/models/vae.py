"""Variational autoencoders of the paper: an MLP VAE for binary images, a conv VAE for colour.

Both have a standard normal prior over a ``latent_dim``-dimensional z and a Gaussian
encoder with diagonal covariance (standard deviations through a softplus, which stays
finite at initialisation where ``exp`` of a log-variance can overflow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmem.models._latent import (
    LOG_2PI,
    LatentVariableModel,
    activation_fn,
    apply_layer,
    mlp_layers,
    run_layers,
    softplus,
)

__all__ = ["MLPVAE", "ConvVAE", "logit_transform", "logit_gaussian_log_density"]

# Floor on the encoder's standard deviations: keeps log q(z|x) finite.
_MIN_STD = 1e-4


def _diag_gaussian(head: jax.Array, latent_dim: int) -> tuple[jax.Array, jax.Array]:
    mean, raw = head[..., :latent_dim], head[..., latent_dim:]
    return mean, softplus(raw) + _MIN_STD


class MLPVAE(LatentVariableModel):
    """The paper's BinarizedMNIST VAE: MLP encoder and decoder, Bernoulli pixels.

    Encoder ``D -> 1024 -> 512 -> 256 -> 2L`` (mean and standard deviation of q(z|x)),
    decoder ``L -> 256 -> 512 -> 1024 -> D`` Bernoulli logits, ReLU activations, ``L = 16``
    (van den Burg & Williams, 2021, appendix; the hidden sizes are configurable). The
    input is flattened; the paper pads MNIST to 32x32 (``example_shape=(32, 32)``), which
    is the data's business, not the model's.

    ``log_prob`` estimates the log-probability of the binary image (nats; the true value
    is a log probability mass, at most 0, though a single importance-weighted estimate
    can exceed it). With ``binarize="dynamic"`` inputs are intensities in [0, 1] and each is
    binarised by a Bernoulli draw — from the batch key in training, from the per-example
    key at evaluation, so evaluation is reproducible. With ``binarize="none"`` inputs are
    taken as they are (they should already be 0/1; other values give the Bernoulli
    cross-entropy, which is not a normalised density).

    Args:
      example_shape: shape of one example, e.g. ``(32, 32)`` or ``(784,)``.
      hidden: encoder hidden sizes; the decoder mirrors them.
      latent_dim: L.
      binarize: ``"dynamic"`` or ``"none"``.
      activation: name of the hidden activation (see ``_latent.ACTIVATIONS``).
      rngs: parameter initialisation.
    """

    def __init__(
        self,
        example_shape: Sequence[int],
        *,
        hidden: Sequence[int] = (1024, 512, 256),
        latent_dim: int = 16,
        binarize: str = "dynamic",
        activation: str = "relu",
        rngs: nnx.Rngs,
    ):
        if binarize not in ("dynamic", "none"):
            raise ValueError(f"binarize must be 'dynamic' or 'none', got {binarize!r}")
        if latent_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"sizes must be positive, got hidden={hidden}, latent_dim={latent_dim}")
        activation_fn(activation)  # validate early
        self.example_shape = tuple(int(s) for s in example_shape)
        self.latent_dim = int(latent_dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.binarize = binarize
        self.activation = activation
        d = math.prod(self.example_shape)
        self.encoder = mlp_layers([d, *self.hidden, 2 * self.latent_dim], rngs)
        self.decoder = mlp_layers([self.latent_dim, *reversed(self.hidden), d], rngs)

    def preprocess(self, x, keys):
        x = x.reshape(x.shape[0], -1)
        if self.binarize == "dynamic":
            # float32 uniforms whatever the x64 flag (bernoulli draws in p's dtype): see _latent
            x = jax.vmap(lambda k, xi: jax.random.bernoulli(k, xi.astype(jnp.float32)).astype(jnp.float32))(
                keys, x)
        return x

    def encode(self, x):
        return _diag_gaussian(run_layers(self.encoder, x, activation_fn(self.activation)), self.latent_dim)

    def log_likelihood(self, x, z):
        b, s, _ = z.shape
        logits = run_layers(self.decoder, z.reshape(b * s, -1), activation_fn(self.activation))
        logits = logits.reshape(b, s, -1)
        # log Bernoulli(x; sigmoid(l)) = x*l - softplus(l)
        return jnp.sum(x[:, None, :] * logits - softplus(logits), axis=-1)


def logit_transform(u: jax.Array, lam: float) -> tuple[jax.Array, jax.Array]:
    """``y = logit(lam + (1 - 2 lam) u)`` and ``log |dy/du|``, elementwise, for u in (0, 1)."""
    s = lam + (1.0 - 2.0 * lam) * u
    log_s, log_1ms = jnp.log(s), jnp.log1p(-s)
    return log_s - log_1ms, math.log(1.0 - 2.0 * lam) - log_s - log_1ms


def logit_gaussian_log_density(u: jax.Array, mean: jax.Array, std: jax.Array, lam: float) -> jax.Array:
    """Elementwise log-density on (0, 1) of u whose logit transform is N(mean, std^2) (nats).

    The logit transform maps (0, 1) onto ``[logit(lam), logit(1 - lam)]`` only, so the
    density integrates to the Gaussian's mass on that interval, not to 1: like the
    paper's, the likelihood is sub-normalised, and log p falls short of the normalised
    (truncated-Gaussian) density's by ``-sum_j log mass_j``. The shortfall is small only
    for broad Gaussians well inside the interval (mass 0.9967 for N(0, 1), as at
    initialisation). A trained decoder fits saturated (black or white) pixels, whose
    dequantised values lie within 0.072 of an end of the interval (``u < 1/256`` gives
    ``y < logit(lam) + 0.072``), with narrow Gaussians at that end, and these put much of
    their mass outside it: a small conv VAE trained 600 Adam steps on 512 of the embedded
    digits (mostly black pixels) kept a median 0.82 of the mass per pixel (min 0.06), so
    its log p (about -270 nats per 8x8 image) fell short by about 16 nats per image (up
    to 27). It cancels out of the memorization score only partly: the models trained
    with and without an example can lose different masses on it.
    """
    y, log_jac = logit_transform(u, lam)
    return -0.5 * ((y - mean) / std) ** 2 - jnp.log(std) - 0.5 * LOG_2PI + log_jac


class ConvVAE(LatentVariableModel):
    """Convolutional VAE for colour images with a Gaussian likelihood in logit space.

    The paper's choice for CIFAR-10 / CelebA. Pixel values ``x`` in [0, 1] on the grid
    ``k/255`` are dequantised to ``u = (k + U(0, 1)) / 256`` in (0, 1), mapped to logit
    space ``y = logit(lam + (1 - 2 lam) u)`` with ``lam = 0.05`` (Dinh et al., 2017), and
    the decoder puts a diagonal Gaussian (per-pixel mean and standard deviation) on y.
    The density is carried back by the log-det Jacobian of the logit transform,

    .. math::

        \\log p(u) = \\log N(y; \\mu(z), \\sigma(z))
            + \\sum_j \\log \\frac{1 - 2\\lambda}{s_j (1 - s_j)}, \\quad s = \\lambda + (1 - 2\\lambda) u,

    and then to the pixel scale ``v = 256 u`` in ``[0, 256)^D`` (subtract ``D log 256``).
    ``log_prob`` is therefore a density over dequantised pixel values in ``[0, 256)^D``
    (sub-normalised: the Gaussians' mass outside the logit range is lost, about 16 nats
    per 8x8 image after a short training on digits, see :func:`logit_gaussian_log_density`),
    nats per image: ``-log_prob / (D log 2)`` is the usual bits per dimension, and an
    upper bound on the discrete model's code length. The memorization score is a
    difference of log-densities, so the choice of space cancels out of it (the lost
    mass only partly: it differs between models).

    With ``dequantize="none"`` the inputs are used as ``u`` directly (continuous data in
    (0, 1)); the density is still reported on the 256-scale.

    Dequantisation noise comes from the batch key in training and from the per-example
    key at evaluation, as for :class:`MLPVAE`'s binarisation.

    Encoder: ``len(channels)`` stride-2 4x4 convolutions, a dense layer of ``dense``
    units, then the 2L-unit head. Decoder: the mirror image with transposed
    convolutions, ending in ``2C`` channels (mean and raw standard deviation per pixel).

    Args:
      example_shape: ``(H, W, C)``; H and W divisible by ``2 ** len(channels)``.
      channels: encoder convolution channels, at least one (decoder mirrors them).
      dense: width of the dense layer between convolutions and latent.
      latent_dim: L.
      lam: the logit transform's lambda.
      dequantize: ``"uniform"`` or ``"none"``.
      activation: hidden activation name.
      rngs: parameter initialisation.
    """

    def __init__(
        self,
        example_shape: Sequence[int],
        *,
        channels: Sequence[int] = (32, 64, 128),
        dense: int = 256,
        latent_dim: int = 64,
        lam: float = 0.05,
        dequantize: str = "uniform",
        activation: str = "relu",
        rngs: nnx.Rngs,
    ):
        example_shape = tuple(int(s) for s in example_shape)
        if len(example_shape) != 3:
            raise ValueError(f"ConvVAE needs example_shape (H, W, C), got {example_shape}")
        h, w, c = example_shape
        if not len(channels):
            raise ValueError(f"channels must name at least one convolution (e.g. channels=[32, 64]), got {channels}")
        if latent_dim < 1 or dense < 1 or any(ch < 1 for ch in channels):
            raise ValueError(f"sizes must be positive, got channels={channels}, dense={dense}, latent_dim={latent_dim}")
        f = 2 ** len(channels)
        if h % f or w % f:
            raise ValueError(f"H and W must be divisible by 2**len(channels) = {f}, got {example_shape}")
        if dequantize not in ("uniform", "none"):
            raise ValueError(f"dequantize must be 'uniform' or 'none', got {dequantize!r}")
        if not 0.0 < lam < 0.5:
            raise ValueError(f"lam must be in (0, 0.5), got {lam}")
        activation_fn(activation)
        self.example_shape = example_shape
        self.latent_dim = int(latent_dim)
        self.channels = tuple(int(ch) for ch in channels)
        self.dense = int(dense)
        self.lam = float(lam)
        self.dequantize = dequantize
        self.activation = activation
        self._bottom = (h // f, w // f, self.channels[-1])
        conv = dict(kernel_size=(4, 4), strides=(2, 2), padding="SAME", rngs=rngs)
        ins = (c, *self.channels[:-1])
        self.enc_convs = nnx.List([nnx.Conv(a, b, **conv) for a, b in zip(ins, self.channels)])
        flat = math.prod(self._bottom)
        self.enc_dense = nnx.Linear(flat, self.dense, rngs=rngs)
        self.enc_head = nnx.Linear(self.dense, 2 * self.latent_dim, rngs=rngs)
        self.dec_dense = nnx.Linear(self.latent_dim, self.dense, rngs=rngs)
        self.dec_expand = nnx.Linear(self.dense, flat, rngs=rngs)
        outs = (*reversed(self.channels[:-1]), 2 * c)
        self.dec_convs = nnx.List(
            [nnx.ConvTranspose(a, b, **conv) for a, b in zip(reversed(self.channels), outs)]
        )

    def preprocess(self, x, keys):
        # float16/bfloat16 pixels to float32 first: the logit transform in 8 significant
        # bits moved log p by ~2 nats per 8x8x3 image (float64 stays float64)
        x = x.astype(jnp.result_type(x.dtype, jnp.float32))
        if self.dequantize == "uniform":
            levels = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0)
            noise = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], jnp.float32))(keys)  # see _latent
            x = (levels + noise) / 256.0
        return x

    def encode(self, x):
        act = activation_fn(self.activation)
        h, _ = logit_transform(x, self.lam)
        for layer in self.enc_convs:
            h = act(layer(h))
        h = act(apply_layer(self.enc_dense, h.reshape(h.shape[0], -1)))
        return _diag_gaussian(apply_layer(self.enc_head, h), self.latent_dim)

    def log_likelihood(self, x, z):
        act = activation_fn(self.activation)
        b, s, _ = z.shape
        h = act(apply_layer(self.dec_dense, z.reshape(b * s, -1)))
        h = act(apply_layer(self.dec_expand, h)).reshape(b * s, *self._bottom)
        h = run_layers(self.dec_convs, h, act)
        c = self.example_shape[-1]
        mean = h[..., :c].reshape(b, s, *self.example_shape)
        std = (softplus(h[..., c:]) + 1e-3).reshape(b, s, *self.example_shape)
        log_u = logit_gaussian_log_density(x[:, None], mean, std, self.lam)
        d = math.prod(self.example_shape)
        # density of u on (0, 1)^D -> density of 256 u on (0, 256)^D
        return jnp.sum(log_u.reshape(b, s, d), axis=-1) - d * math.log(256.0)
