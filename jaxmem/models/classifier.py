"""An MLP classifier for label memorization (Feldman & Zhang, 2020)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from jaxmem.models._latent import activation_fn, check_batch, check_keys, mlp_layers, run_layers

__all__ = ["Classifier"]


class Classifier(nnx.Module):
    """MLP classifier ``x -> logits``; its "likelihood" is log p(y|x).

    Batches are tuples ``(x, y)``: x f32 ``[B, *example_shape]`` (flattened), y int
    ``[B]`` in ``[0, num_classes)`` (a label outside gives NaN). It has the same interface as the VAEs, so the
    ensemble and likelihood kernels treat it alike: ``loss`` is the cross-entropy,
    ``log_prob`` and ``elbo`` the exact log p(y|x) (keys and ``num_samples`` unused).

    Args:
      example_shape: shape of one input.
      num_classes: number of labels.
      hidden: hidden layer sizes, each positive (none: a linear classifier).
      activation: hidden activation name.
      rngs: parameter initialisation.
    """

    def __init__(
        self,
        example_shape: Sequence[int],
        *,
        num_classes: int = 10,
        hidden: Sequence[int] = (512, 256),
        activation: str = "relu",
        rngs: nnx.Rngs,
    ):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if any(h < 1 for h in hidden):
            raise ValueError(f"sizes must be positive, got hidden={hidden}")
        activation_fn(activation)
        self.example_shape = tuple(int(s) for s in example_shape)
        self.num_classes = int(num_classes)
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        sizes = [math.prod(self.example_shape), *self.hidden, self.num_classes]
        self.layers = mlp_layers(sizes, rngs)

    def _unpack(self, batch, what):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(f"Classifier.{what} expects a batch (x, y), got {type(batch).__name__}")
        x, y = batch
        check_batch(x, self.example_shape, f"Classifier.{what}")
        if y.shape != (x.shape[0],) or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"labels must be int [{x.shape[0]}], got {y.dtype} {y.shape}")
        return x, y

    def logits(self, x: ArrayLike) -> jax.Array:
        """Unnormalised log-probabilities ``[B, num_classes]``."""
        return run_layers(self.layers, x.reshape(x.shape[0], -1), activation_fn(self.activation))

    def _log_p_y(self, x, y):
        logp = jax.nn.log_softmax(self.logits(x), axis=-1)
        y = y.astype(jnp.int32)
        picked = jnp.take_along_axis(logp, jnp.clip(y, 0, self.num_classes - 1)[:, None], axis=-1)[:, 0]
        # NaN, not a wrapped index (y = -1 would read the last class): the non-finite
        # checks downstream then name the example with the bad label.
        return jnp.where((y >= 0) & (y < self.num_classes), picked, jnp.nan)

    def loss(self, batch, key: jax.Array) -> jax.Array:
        """Cross-entropy ``-log p(y|x)`` per example (nats, ``[B]``); ``key`` unused."""
        del key
        x, y = self._unpack(batch, "loss")
        return -self._log_p_y(x, y)

    def log_prob(self, batch, keys: jax.Array, num_samples: int = 1) -> jax.Array:
        """Exact ``log p(y|x)`` per example (nats, ``[B]``); keys and num_samples unused."""
        del num_samples
        x, y = self._unpack(batch, "log_prob")
        check_keys(keys, x.shape[0])
        return self._log_p_y(x, y)

    def elbo(self, batch, keys: jax.Array, num_samples: int = 1) -> jax.Array:
        """Same as :meth:`log_prob` (there is no latent variable)."""
        return self.log_prob(batch, keys, num_samples)

    def predict(self, x: ArrayLike) -> jax.Array:
        """Predicted labels, int32 ``[B]``."""
        check_batch(x, self.example_shape, "Classifier.predict")
        return jnp.argmax(self.logits(x), axis=-1).astype(jnp.int32)

    def correct(self, batch) -> jax.Array:
        """Whether the prediction equals the label, bool ``[B]`` (Feldman & Zhang's 1[h(x)=y])."""
        x, y = self._unpack(batch, "correct")
        return self.predict(x) == y
