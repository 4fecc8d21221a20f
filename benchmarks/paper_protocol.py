"""The paper's whole MNIST protocol, projected from the two measured benchmarks.

Reads ``results/ensemble_training-<backend>.json`` and ``results/likelihood-<backend>.json``
(written by ``ensemble_training.py`` and ``likelihood.py`` on the same machine) and projects
the time of van den Burg & Williams' binarized-MNIST protocol: 100 models (10 folds x 10
repeats), 100 epochs each on 54,000 examples, with S = 256 importance-weighted
log-likelihoods. The paper's script (``MarginalTrainer.fit`` with ``compute_px_every=10``)
evaluates the marginal likelihood of its training and held-out loaders (all 60,000
examples) every 10 epochs, so 10 passes per model; jaxmem computes the matrix once after
training (``memorization()``), or at chosen epochs with ``track_epochs``. Both are shown:

- ``paper's code``: 100 x (100 epochs x row (c) + 10 passes x 60,000 pairs / paper rate);
- ``jaxmem, same 10 passes``: 100 x (100 epochs x row (a) + 10 x 60,000 / jaxmem rate);
- ``jaxmem, one pass``: 100 x (100 epochs x row (a) + 60,000 / jaxmem rate);
- the two jaxmem rows again with scoring at the rate of the likelihood benchmark's opt-in
  ``jaxmem bf16`` row (``loglik_matrix(matmul_dtype="bfloat16")``; training is float32
  in every row), when that row is in the JSON.

Per member-epoch times include the held-out loss of every epoch on both sides (the paper's
``test`` pass, jaxmem's ``heldout_loss``). Nothing is measured here: it is arithmetic on
the two JSON files, printed with their machine description.

Usage::

    python benchmarks/paper_protocol.py [--backend cpu]   # or gpu, cpu-epyc: results/*-<that>.json
"""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS, EPOCHS, N, PASSES = 100, 100, 60_000, 10


def load(name: str, backend: str) -> dict:
    path = os.path.join(HERE, "results", f"{name}-{backend}.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: run benchmarks/{name}.py on this machine first")
    with open(path) as f:
        return json.load(f)


# What both measurements must have run for the projection to be the paper's protocol: its
# MNIST VAE (MLP 1024-512-256, z = 16, 32x32 inputs), batch 64, 844 steps per member-epoch
# (54,000 examples), K = 10 members side by side, S = 256 importance samples.
PAPER_TRAINING = {"members": 10, "batch": 64, "hidden": [1024, 512, 256], "latent": 16,
                  "full_steps": 844, "quick": False}
PAPER_LIKELIHOOD = {"members": 10, "samples": 256, "hidden": [1024, 512, 256], "latent": 16,
                    "image": [32, 32]}


def check_sizes(name: str, result: dict, want: dict) -> list[str]:
    """Where ``result["sizes"]`` differs from the paper's setting ``want`` ("key: got vs paper")."""
    sizes = result.get("sizes", {})
    return [f"{name} {k}: {sizes.get(k, '<missing>')!r} (the paper's protocol: {v!r})"
            for k, v in want.items() if sizes.get(k, "<missing>") != v]


def row(rows: list[dict], key: str, prefix: str, required: bool = True) -> dict | None:
    """The first row whose ``key`` starts with ``prefix`` (None if there is none and not ``required``)."""
    for r in rows:
        if str(r[key]).startswith(prefix):
            return r
    if not required:
        return None
    raise SystemExit(f"no row starting with {prefix!r} in {[r[key] for r in rows]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu",
                    help="which results to read: the suffix of results/<name>-<suffix>.json "
                         "(cpu, gpu, or a machine's kept copy such as cpu-epyc)")
    ap.add_argument("--force", action="store_true",
                    help="project even from measurements of other sizes than the paper's (a warning "
                         "names them; the JSON records them)")
    args = ap.parse_args()
    ens, ll = load("ensemble_training", args.backend), load("likelihood", args.backend)
    off = check_sizes("ensemble_training", ens, PAPER_TRAINING) + check_sizes("likelihood", ll, PAPER_LIKELIHOOD)
    if off and not args.force:
        raise SystemExit("the measurements are not of the paper's setting, so their projection would not be "
                         "the paper's protocol:\n  " + "\n  ".join(off) + "\nrerun ensemble_training.py "
                         "and likelihood.py with their default sizes (or pass --force)")
    m = ens["machine"]
    print(f"# paper_protocol ({m['backend']}, {m['device_kind']}, {m['cpu_count']} CPUs; "
          f"training measured {m['date']}, likelihood {ll['machine']['date']})")
    print(f"# training sizes {ens['sizes']}\n# likelihood sizes {ll['sizes']}\n# versions: "
          + ", ".join(f"{k} {m.get(k)}" for k in ("python", "jax", "jaxlib", "flax", "torch")))
    for line in off:
        print(f"# WARNING (--force): {line}")
    t_a = row(ens["rows"], "variant", "(a)")["s_per_member_epoch"]
    t_c = row(ens["rows"], "variant", "(c)")["s_per_member_epoch"]
    r_a = row(ll["rows"], "impl", "jaxmem")["pairs_per_s"]  # the first jaxmem row: float32
    bf16 = row(ll["rows"], "impl", "jaxmem bf16", required=False)
    r_b = bf16["pairs_per_s"] if bf16 else None
    r_c = row(ll["rows"], "impl", "paper")["pairs_per_s"]
    cases = {
        "paper's code (10 likelihood passes)": (t_c, r_c, PASSES),
        "jaxmem, the same 10 passes": (t_a, r_a, PASSES),
        "jaxmem, one pass (memorization())": (t_a, r_a, 1),
    }
    if r_b:
        cases["jaxmem, the same 10 passes, bf16 scoring"] = (t_a, r_b, PASSES)
        cases["jaxmem, one pass, bf16 scoring"] = (t_a, r_b, 1)
    paper_total = None
    print(f"{'':42s} {'train h':>9s} {'likelihood h':>13s} {'total h':>9s} {'vs paper':>9s}")
    out = {}
    for name, (t, r, passes) in cases.items():
        train = MODELS * EPOCHS * t / 3600
        lik = MODELS * passes * N / r / 3600
        total = train + lik
        paper_total = paper_total or total
        out[name] = {"train_hours": train, "likelihood_hours": lik, "total_hours": total,
                     "speedup_vs_paper": paper_total / total}
        print(f"{name:42s} {train:9.1f} {lik:13.1f} {total:9.1f} {paper_total / total:8.2f}x")
    path = os.path.join(HERE, "results", f"paper_protocol-{args.backend}.json")
    with open(path, "w") as f:
        json.dump({"inputs": {"s_per_member_epoch_jaxmem": t_a, "s_per_member_epoch_paper": t_c,
                              "pairs_per_s_jaxmem": r_a, "pairs_per_s_paper": r_c,
                              "pairs_per_s_jaxmem_bf16": r_b,
                              "models": MODELS, "epochs": EPOCHS, "n": N, "paper_passes": PASSES},
                   "sizes": {"ensemble_training": ens["sizes"], "likelihood": ll["sizes"]},
                   "not_the_papers_sizes": off, "machine": m, "projection": out}, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
