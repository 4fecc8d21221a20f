"""Memorization scores from inside your own JAX training loop.

`jaxmem run` does everything for you; this script shows the pieces underneath, for when
the training loop is yours (your batches, your schedule, your logging):

1. ``jaxmem.membership.kfold``: which member trains on which example (``keep[m, i]``).
2. ``jaxmem.ensemble.make``: pure ``init`` / ``step`` / ``evaluate`` functions that train
   every member at once (one jitted, vmapped program). Here we feed ``step`` with our
   own per-member batches and an optax schedule of our choosing.
3. ``jaxmem.likelihood.loglik_matrix``: importance-weighted log p(x_i) under every
   member, ``ll[m, i]`` in nats.
4. ``jaxmem.scores.memorization_scores``: U, V, M = U - V with standard errors.

Run:  python examples/own_training_loop.py [--limit 600 --folds 5 --repeats 2 --epochs 30]
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmem import ensemble, membership, models, scores
from jaxmem.data import load_dataset
from jaxmem.likelihood import loglik_matrix
from jaxmem.mesh import make_mesh


def member_batches(keep: np.ndarray, steps: int, batch_size: int, rng) -> np.ndarray:
    """int ``[steps, members, batch_size]``: each member's shuffled training indices.

    Every member draws only from its own training examples (``keep[m]``); its
    permutation is read cyclically so that all members take the same number of steps.
    """
    out = np.empty((steps, keep.shape[0], batch_size), np.int32)
    for m, row in enumerate(keep):
        mine = rng.permutation(np.flatnonzero(row))
        out[:, m] = np.resize(mine, steps * batch_size).reshape(steps, batch_size)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=600, help="digits used")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2,
                   help="K-fold splits; 2 or more give every example 2+ held-out models, "
                        "so its score has a standard error")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 64])
    p.add_argument("--samples", type=int, default=64, help="importance samples per log p")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    data = load_dataset("digits", limit=args.limit, binarize="dynamic")
    x = jnp.asarray(data.x)  # [n, 8, 8, 1] intensities; the VAE binarizes on the fly
    n = len(data)
    plan = membership.kfold(n, args.folds, repeats=args.repeats, seed=args.seed)

    def make_model(seed):
        return models.create("mlp_vae", data.example_shape, seed=seed,
                             hidden=args.hidden, latent_dim=8)

    steps = math.ceil(plan.keep.sum(axis=1).max() / args.batch_size)
    # Your optimizer, your schedule: cosine decay over the whole run.
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, args.epochs * steps))
    ens = ensemble.make(make_model, tx, plan.keep, batch_size=args.batch_size)
    state = ens.init(args.seed)

    rng = np.random.default_rng(args.seed)
    for epoch in range(1, args.epochs + 1):
        idx = member_batches(plan.keep, steps, args.batch_size, rng)
        losses = []
        for s in range(steps):
            batch = x[idx[s]]  # [members, batch_size, 8, 8, 1]
            state, loss = ens.step(state, batch)  # one Adam step of every member
            losses.append(loss)
        if epoch % max(1, args.epochs // 5) == 0 or epoch == args.epochs:
            heldout = ens.evaluate(state, x)  # each member on the examples it never saw
            print(f"epoch {epoch:3d}: train {float(jnp.mean(jnp.stack(losses))):.2f}, "
                  f"held-out {float(jnp.mean(heldout)):.2f} nats per digit")

    # The members' full states, stacked on axis 0 (docs/CONTRACTS.md). Training split
    # the members over devices; scoring splits the examples over all devices (and places
    # every member on each).
    mesh = make_mesh()
    members = nnx.merge_state(state.params, state.rest)
    ll = loglik_matrix(ens.graphdef, members, x, key=jax.random.key(args.seed + 1),
                       num_samples=args.samples, mesh=mesh)
    s = scores.memorization_scores(ll, plan.keep)

    M, se = np.asarray(s.M), np.asarray(s.stderr)
    print(f"\nM over {n} digits: median {np.median(M):.2f}, 0.95 quantile "
          f"{float(s.threshold):.2f} nats ({int(np.sum(s.highly_memorized))} highly memorized)")
    print("most memorized:   index label  M (nats) +- stderr")
    for i in np.argsort(-M)[:5]:
        print(f"                  {i:5d} {data.y[i]:5d}  {M[i]:7.2f} +- {se[i]:.2f}")
    return {"ll": np.asarray(ll), "keep": plan.keep, "scores": s, "x": data.x,
            "graphdef": ens.graphdef, "members": members, "seed": args.seed,
            "samples": args.samples}


if __name__ == "__main__":
    main()
