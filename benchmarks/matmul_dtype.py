"""bf16 matmuls for scoring (``loglik_matrix(matmul_dtype="bfloat16")``): speed and what it costs.

The paper's MNIST VAE (MLP 1024-512-256, z = 16, Bernoulli decoder on 32x32 inputs)
trained as a K-fold ensemble on real handwritten digits (scikit-learn's 1,797 8x8 digits,
the embedded data set, resized to 32x32: MNIST's input size, offline; binarized once,
statically, as the paper's binarized MNIST is, so that a scoring key changes only the
importance samples), then scored three times with S importance samples:

- ``f32``:  float32 matmuls, key A (the default);
- ``bf16``: bf16-rounded inputs and kernels, float32 accumulation, the same key A, so
  the very same importance samples: the difference is the rounding alone;
- ``f32'``: float32 again with another key B: the Monte Carlo spread of the S-sample
  estimate itself, the yardstick for the rounding's effect;
- on accelerators also ``highest``: float32 at ``jax.default_matmul_precision("highest")``,
  since their default f32 matmuls are TF32 (NVIDIA) or bf16 passes (TPU); the default's
  difference from it is printed as well.

It prints the log-likelihood and memorization-score differences (bf16 - f32, and
f32' - f32: mean, RMS, largest), the rank correlation of M, and the overlap of the
"highly memorized" sets (M above its 95% quantile), then the scoring rate of f32 and
bf16 timed in interleaved rounds on the same ensemble, with each one's achieved FLOP/s
against the device's measured f32 and bf16 matmul peaks.

Run: python benchmarks/matmul_dtype.py [--quick] [--folds 5] [--epochs 20] [--samples 256]
(about 4 minutes on the project's 2-core CPU with the defaults).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

import _common  # noqa: E402
from jaxmem import ensemble, membership, models, scores  # noqa: E402
from jaxmem.data import load_dataset  # noqa: E402
from jaxmem.likelihood import loglik_matrix  # noqa: E402

HIDDEN = (1024, 512, 256)
LATENT = 16
SIDE = 32


def diff_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean, RMS and largest absolute value of ``a - b`` (finite entries)."""
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)).ravel()
    d = d[np.isfinite(d)]
    return {"mean": float(d.mean()), "rms": float(np.sqrt(np.mean(d * d))), "max_abs": float(np.abs(d).max())}


def top_overlap(a: np.ndarray, b: np.ndarray, q: float = 0.95) -> float:
    """Jaccard overlap of the examples above each score's ``q`` quantile."""
    sa, sb = a > np.quantile(a, q), b > np.quantile(b, q)
    return float((sa & sb).sum() / max(1, (sa | sb).sum()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for development")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--time-examples", type=int, default=None,
                    help="examples of each timed scoring call (default 256 on CPUs, all on accelerators)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best of each)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    limit = 256 if args.quick else None
    if args.quick:
        args.epochs, args.samples, args.time_examples, args.rounds = 2, 16, 64, 1
    data = load_dataset("digits", resize_to=SIDE, binarize="static", seed=args.seed, limit=limit)
    x = data.x.reshape(-1, SIDE, SIDE)
    n = x.shape[0]
    if args.time_examples is None:
        args.time_examples = 256 if jax.default_backend() == "cpu" else n
    sizes = dict(examples=n, image=(SIDE, SIDE), hidden=HIDDEN, latent=LATENT, folds=args.folds,
                 epochs=args.epochs, samples=args.samples, batch=64, time_examples=args.time_examples,
                 rounds=args.rounds)
    info = _common.header("matmul_dtype", sizes)

    plan = membership.kfold(n, args.folds, seed=args.seed)
    factory = lambda s: models.create("mlp_vae", (SIDE, SIDE), seed=s, hidden=HIDDEN, latent_dim=LATENT)  # noqa: E731
    t0 = time.perf_counter()
    fit = ensemble.fit(factory, 1e-3, x, plan, epochs=args.epochs, batch_size=64, seed=args.seed, progress=False)
    train_s = time.perf_counter() - t0
    h = fit.history
    print(f"trained {plan.num_models} members x {args.epochs} epochs in {train_s:.0f} s; "
          f"last epoch train {h['train_loss'][-1].mean():.2f}, held-out {h['heldout_loss'][-1].mean():.2f} "
          f"nats (epoch 1: {h['heldout_loss'][0].mean():.2f})")

    key_a, key_b = jax.random.key(args.seed + 1), jax.random.key(args.seed + 2)
    score = lambda key, dt, xs=x: np.asarray(  # noqa: E731
        loglik_matrix(fit.graphdef, fit.state, xs, key=key, num_samples=args.samples, matmul_dtype=dt))
    t0 = time.perf_counter()
    ll = {"f32": score(key_a, None), "bf16": score(key_a, "bfloat16"), "f32'": score(key_b, None)}
    if jax.default_backend() != "cpu":  # CPUs multiply f32 in f32 by default
        with jax.default_matmul_precision("highest"):
            ll["highest"] = score(key_a, None)
    print(f"scored {plan.num_models} x {n} pairs {len(ll)} times in {time.perf_counter() - t0:.0f} s")
    M = {k: np.asarray(scores.memorization_scores(v, plan).M) for k, v in ll.items()}

    accuracy = {
        "ll_mean_f32": float(ll["f32"].mean()),
        "ll_bf16_minus_f32": diff_stats(ll["bf16"], ll["f32"]),
        "ll_mc_f32b_minus_f32": diff_stats(ll["f32'"], ll["f32"]),
        "M_spread_f32": {"sd": float(M["f32"].std()), "q95": float(np.quantile(M["f32"], 0.95))},
        "M_bf16_minus_f32": diff_stats(M["bf16"], M["f32"]),
        "M_mc_f32b_minus_f32": diff_stats(M["f32'"], M["f32"]),
        "spearman_M_bf16_f32": float(stats.spearmanr(M["bf16"], M["f32"])[0]),
        "spearman_M_f32b_f32": float(stats.spearmanr(M["f32'"], M["f32"])[0]),
        "top5pct_jaccard_bf16_f32": top_overlap(M["bf16"], M["f32"]),
        "top5pct_jaccard_f32b_f32": top_overlap(M["f32'"], M["f32"]),
    }
    if "highest" in ll:
        accuracy["ll_default_minus_highest"] = diff_stats(ll["f32"], ll["highest"])
        accuracy["M_default_minus_highest"] = diff_stats(M["f32"], M["highest"])
    a = accuracy
    rows = []
    for what, rounding, mc in [("log p (nats)", a["ll_bf16_minus_f32"], a["ll_mc_f32b_minus_f32"]),
                               ("M (nats)", a["M_bf16_minus_f32"], a["M_mc_f32b_minus_f32"])]:
        rows.append({"quantity": what, "bf16-f32 mean": rounding["mean"], "bf16-f32 rms": rounding["rms"],
                     "bf16-f32 max": rounding["max_abs"], "f32'-f32 rms": mc["rms"], "f32'-f32 max": mc["max_abs"],
                     "rms ratio": rounding["rms"] / mc["rms"]})
    if "highest" in ll:
        for what, q in [("log p (nats)", "ll"), ("M (nats)", "M")]:
            d = a[f"{q}_default_minus_highest"]
            print(f"default f32 precision - 'highest', {what}: mean {d['mean']:.4g}, rms {d['rms']:.4g}, "
                  f"max {d['max_abs']:.4g}")
    _common.print_table(rows, list(rows[0]), title=(
        f"rounding (bf16 - f32, same samples) vs Monte Carlo spread (f32' - f32, other samples); "
        f"mean log p {a['ll_mean_f32']:.2f} nats, sd of M {a['M_spread_f32']['sd']:.3f} nats"))
    print(f"Spearman of M: bf16 vs f32 {a['spearman_M_bf16_f32']:.4f}, f32' vs f32 {a['spearman_M_f32b_f32']:.4f}; "
          f"overlap of the top 5%: bf16 vs f32 {a['top5pct_jaccard_bf16_f32']:.3f}, "
          f"f32' vs f32 {a['top5pct_jaccard_f32b_f32']:.3f}")

    # Speed: both on the same ensemble and examples, interleaved with the two peaks.
    xt = x[: args.time_examples]
    enc, dec = _common.mlp_vae_macs(SIDE * SIDE, HIDDEN, LATENT)
    flops = plan.num_models * xt.shape[0] * 2.0 * (enc + args.samples * dec)
    fns = {"f32": lambda: score(key_a, None, xt), "bf16": lambda: score(key_a, "bfloat16", xt)}
    f32_peaks, peak_flops = _common.matmul_peak_fns("peak f32")
    fns.update(f32_peaks)
    fns.update(_common.matmul_peak_fns("peak bf16", dtype=jnp.bfloat16)[0])
    best = _common.interleaved_best(fns, rounds=args.rounds)
    peaks = {k: _common.peak_of(best, peak_flops, f"peak {k}") for k in ("f32", "bf16")}
    print(f"matmul peaks (best of {args.rounds} interleaved rounds): f32 {peaks['f32'] / 1e9:.1f}, "
          f"bf16 (f32 accumulation) {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    pairs = plan.num_models * xt.shape[0]
    timing = []
    for name in ("f32", "bf16"):
        rate = flops / best[name]
        timing.append({"matmul_dtype": name, "pairs_per_s": pairs / best[name], "gflop_per_s": rate / 1e9,
                       "of f32 peak": rate / peaks["f32"], "of its peak": rate / peaks[name],
                       "speedup": best["f32"] / best[name]})
    _common.print_table(timing, list(timing[0]), title=(
        f"scoring {plan.num_models} members x {xt.shape[0]} examples, S={args.samples} "
        f"(dense-matmul FLOPs {flops:.4g}); speedup = f32 time / this time"))
    _common.write_json("matmul_dtype", {
        "machine": info, "sizes": sizes, "train_seconds": train_s,
        "heldout_loss_first_last": [float(h["heldout_loss"][0].mean()), float(h["heldout_loss"][-1].mean())],
        "accuracy": accuracy, "peaks_flops": peaks, "timing": timing,
    })


if __name__ == "__main__":
    main()
