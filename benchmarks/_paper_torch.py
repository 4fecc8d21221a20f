"""The paper's own PyTorch code path, re-implemented for side-by-side timing.

van den Burg & Williams (NeurIPS 2021) published their code at
github.com/alan-turing-institute/memorization (``scripts/``). This module redoes, in our
own code, the operations that code performs for the binarized-MNIST MLP VAE, so that the
benchmarks can time "the paper's code on the same machine" without its repository, data
downloads or torchvision:

- data (``dataset.py``): torchvision's MNIST gives each item as a 28x28 ``uint8`` PIL
  image; the transforms ``Pad(2)``, ``ToTensor()`` and ``Binarize()`` run per item, on
  every fetch (so binarization is dynamic); a ``Subset`` of the fold's indices feeds a
  ``DataLoader(batch_size=64, shuffle=True)``, with no worker processes on a CPU and 4
  with CUDA. :class:`MNISTLike` does the same per-item work with Pillow (torchvision's
  ``Pad`` calls Pillow's ``ImageOps.expand`` and ``ToTensor`` converts through numpy);
- model (``models.py``, ``BernoulliMLPVAE``): ``Linear``+``ReLU`` encoder, separate
  ``Linear`` heads for the mean and the log-variance, ``Linear``+``ReLU`` decoder ending
  in ``Sigmoid``; the loss is ``binary_cross_entropy`` on the sigmoid's probabilities
  (summed) plus the analytic KL term, summed over the batch;
- training (``trainer.py``, ``BaseTrainer.train``): per batch ``zero_grad``, loss,
  ``backward``, Adam ``step`` and ``loss.item()``; the progress ``print`` every 10 batches
  is left out (it only makes the original slower);
- likelihood (``trainer.py``, ``MarginalTrainer.marginal_batch``): per loader batch of 64
  examples, encode once, draw S latents from a ``MultivariateNormal`` with a
  ``diag_embed`` covariance, decode all S x 64 latents at once, repeat the batch S times
  for the Bernoulli log-likelihood, and take ``logsumexp`` over samples minus ``log S``.

The architecture's sizes are arguments (the issue's 1024-512-256, z = 16), so the
arithmetic is the same as the jaxmem rows it is compared with.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torch.distributions import MultivariateNormal
from torch.nn.functional import binary_cross_entropy
from torch.utils.data import DataLoader, Dataset, Subset


class MNISTLike(Dataset):
    """28x28 ``uint8`` images served as torchvision's MNIST + Pad(2), ToTensor, Binarize.

    Args:
      images: ``(n, 28, 28)`` uint8.
    """

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index], mode="L")  # torchvision MNIST.__getitem__
        img = ImageOps.expand(img, border=2, fill=0)  # transforms.Pad(padding=2)
        t = torch.from_numpy(np.array(img, np.uint8)).view(1, 32, 32).float().div(255)  # ToTensor
        t = torch.Tensor(t.size()).bernoulli_(t)  # Binarize
        return t, 0, index


def loader(dataset: Dataset, indices: np.ndarray, batch_size: int = 64) -> DataLoader:
    """``SplitDataset.create_subset_loader``: a shuffled loader over a fold's indices."""
    workers = 4 if torch.cuda.is_available() else 0
    return DataLoader(Subset(dataset, torch.as_tensor(indices)), batch_size=batch_size, shuffle=True,
                      num_workers=workers)


class BernoulliMLPVAE(nn.Module):
    """The paper's ``BernoulliMLPVAE`` with configurable hidden sizes (32x32x1 inputs)."""

    def __init__(self, hidden=(1024, 512, 256), latent: int = 16, d: int = 32 * 32):
        super().__init__()
        self.latent_dim = latent
        enc, prev = [nn.Flatten()], d
        for h in hidden:
            enc += [nn.Linear(prev, h), nn.ReLU(True)]
            prev = h
        self._encoder = nn.Sequential(*enc)
        self._mu = nn.Linear(prev, latent)
        self._logvar = nn.Linear(prev, latent)
        dec, prev = [], latent
        for h in reversed(hidden):
            dec += [nn.Linear(prev, h), nn.ReLU(True)]
            prev = h
        dec += [nn.Linear(prev, d), nn.Sigmoid(), nn.Unflatten(1, (1, 32, 32))]
        self._decoder = nn.Sequential(*dec)

    def encode(self, x):
        h = self._encoder(x)
        return self._mu(h), self._logvar(h)

    def decode(self, z):
        return self._decoder(z)

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar

    @staticmethod
    def log_pxz(pred, true):
        return -binary_cross_entropy(pred, true, reduction="none").sum(axis=(1, 2, 3))

    def step(self, x):
        pred, mu, logvar = self(x)
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return -self.log_pxz(pred, x).sum() + kld


def train_steps(model: BernoulliMLPVAE, optimizer, batches: DataLoader, steps: int, device) -> float:
    """``BaseTrainer.train`` for ``steps`` batches (cycling the loader); returns the summed loss."""
    model.train()
    total, done = 0.0, 0
    while done < steps:
        for x, _, _ in batches:
            x = x.to(device)
            optimizer.zero_grad()
            loss = model.step(x)
            loss.backward()
            optimizer.step()
            total += loss.item()
            done += 1
            if done == steps:
                break
    return total


@torch.no_grad()
def marginal_batch(model: BernoulliMLPVAE, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``MarginalTrainer.marginal_batch``: importance-weighted log p(x), shape ``(B,)``."""
    latent, b, dev = model.latent_dim, x.shape[0], x.device
    prior = MultivariateNormal(torch.zeros(latent, device=dev), torch.eye(latent, device=dev))
    mu, logvar = model.encode(x)
    q = MultivariateNormal(mu, torch.diag_embed(logvar.exp()))
    zs = q.sample((num_samples,))
    log_p_z, log_q_z = prior.log_prob(zs), q.log_prob(zs)
    y = model.decode(zs.view(-1, latent))
    log_pxz = model.log_pxz(y, x.repeat(num_samples, 1, 1, 1)).view(num_samples, b)
    return torch.logsumexp(log_pxz + log_p_z - log_q_z, 0) - torch.log(torch.tensor(float(num_samples)))


def random_mnist_like(n: int, seed: int = 0, density: float = 0.5) -> np.ndarray:
    """``(n, 28, 28)`` uint8 images of 0 and 255 (timing data)."""
    return ((np.random.default_rng(seed).random((n, 28, 28)) < density) * 255).astype(np.uint8)
