"""Label memorization of a classifier ensemble (Feldman & Zhang, 2020) on real digits.

Each of ``--models`` MLP classifiers trains on a uniformly random 70% of scikit-learn's
1,797 handwritten digits. For every digit, Feldman & Zhang's estimator compares the
models that trained on it with those that did not:

    mem_i = mean_{m in}  1[h_m(x_i) = y_i]  -  mean_{m out} 1[h_m(x_i) = y_i]

(a difference of accuracies in [-1, 1]); the log p(y|x) version uses the mean
log-probability of the true label instead (nats). Digits with high label memorization
are the ones a model gets right only when it has seen them: ambiguous or atypical
writing, possibly wrong labels.

Run:  python examples/label_memorization.py [--models 16 --epochs 30]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem import ensemble, membership, models, scores
from jaxmem.data import load_dataset
from jaxmem.likelihood import loglik_matrix
from jaxmem.mesh import make_mesh


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=16)
    p.add_argument("--rate", type=float, default=0.7, help="share of digits per model")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, nargs="+", default=[128])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    data = load_dataset("digits", limit=args.limit)
    x, y = jnp.asarray(data.x), jnp.asarray(data.y)
    plan = membership.random_subsets(len(data), args.models, args.rate, seed=args.seed)
    # With independent random subsets a digit can land in every subset or in none;
    # it then has no "out" (or "in") model and no estimate. Score only the others.
    scored = (plan.in_counts() > 0) & (plan.out_counts() > 0)
    print(f"{len(data)} digits, {args.models} classifiers on random {args.rate:.0%} subsets; "
          f"{int((~scored).sum())} digit(s) never (or always) held out are not scored")

    def make_model(seed):
        return models.create("classifier", data.example_shape, seed=seed,
                             num_classes=10, hidden=args.hidden)

    fitted = ensemble.fit(make_model, 1e-3, (x, y), plan.keep, epochs=args.epochs,
                          batch_size=args.batch_size, seed=args.seed, progress=False)

    key = jax.random.key(args.seed)  # unused by a classifier: its outputs are exact
    # Scoring splits the digits over all devices (loglik_matrix puts every model on each).
    mesh = make_mesh()
    state = fitted.state
    # [models, n]: does model m classify digit i correctly? and log p_m(y_i | x_i), nats.
    right = np.asarray(loglik_matrix(fitted.graphdef, state, (x, y), key=key,
                                     kind="correct", mesh=mesh)) > 0.5
    logp = np.asarray(loglik_matrix(fitted.graphdef, state, (x, y), key=key, mesh=mesh))
    keep = plan.keep[:, scored]
    acc = scores.feldman_zhang(right[:, scored], keep)
    nats = scores.feldman_zhang(logp[:, scored], keep)

    mem = np.asarray(acc.mem)
    idx = np.flatnonzero(scored)
    held_out_acc = (right & ~plan.keep).sum() / (~plan.keep).sum()
    print(f"accuracy on held-out digits: {held_out_acc:.3f}; mean label memorization "
          f"{mem.mean():.3f}; {int((mem > 0.5).sum())} digits above 0.5")
    print("most memorized labels:  digit  label  mem   (acc in / out)   mem in nats")
    for j in np.argsort(-mem, kind="stable")[:8]:
        i = idx[j]
        print(f"                       {i:5d}  {int(data.y[i]):5d}  {mem[j]:+.2f}  "
              f"({float(acc.mean_in[j]):.2f} / {float(acc.mean_out[j]):.2f})   "
              f"{float(nats.mem[j]):+.2f}")
    return {"correct": right, "logp": logp, "keep": plan.keep, "scored": scored,
            "accuracy": acc, "nats": nats}


if __name__ == "__main__":
    main()
