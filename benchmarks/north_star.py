"""The paper's whole MNIST setting, timed: 100 VAEs x 100 epochs, then S = 256 likelihoods.

van den Burg & Williams (2021) train K = 10 folds x R = 10 repeats of the BinarizedMNIST
VAE (MLP 1024-512-256, z = 16, batch 64, Adam 1e-3) for 100 epochs on the 60,000
training images (padded to 32x32), then evaluate 256-sample importance-weighted
log-likelihoods of every example under every model. jaxmem trains all 100 members in
one jitted program and scores them with one sharded kernel.

Timing data are random binary 32x32 images of MNIST's size (the work is the same as on
MNIST; no download is possible on the benchmark machines). With ``--measure-epochs E``
the script trains E epochs and projects the 100-epoch time from the measured seconds
per epoch (compilation reported separately); ``--measure-examples N`` scores N
examples and projects to all of them. Both projections are linear in the work, which
is exact for this fixed-shape program; ``--epochs``/``--measure-epochs`` equal runs it
in full.

Usage::

    python benchmarks/north_star.py                      # measure 2 epochs, 4,096 examples
    python benchmarks/north_star.py --measure-epochs 100 --measure-examples 60000   # all of it
    python benchmarks/north_star.py --quick              # small sizes for a CPU check
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import _common
import jaxmem
from jaxmem import ensemble, models
from jaxmem.models._latent import MATMUL_DTYPES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=100, help="epochs of the setting (projected)")
    ap.add_argument("--measure-epochs", type=int, default=2, help="epochs actually trained")
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 512, 256])
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--measure-examples", type=int, default=4096)
    ap.add_argument("--example-chunk", type=int, default=64)
    ap.add_argument("--sample-chunk", type=int, default=64)
    ap.add_argument("--matmul-dtype", choices=MATMUL_DTYPES, default="float32",
                    help="matmul inputs of the likelihood stage (loglik_matrix's matmul_dtype; training is float32)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.folds, args.repeats, args.n, args.hidden = 2, 2, 2048, [256, 128]
        args.measure_epochs, args.measure_examples, args.samples = 1, 256, 32

    sizes = {
        "members": args.folds * args.repeats, "epochs": args.epochs, "n": args.n,
        "image": f"{args.side}x{args.side}", "hidden": args.hidden, "latent": args.latent,
        "batch": args.batch_size, "S": args.samples, "matmul_dtype": args.matmul_dtype,
        "measure_epochs": args.measure_epochs, "measure_examples": args.measure_examples,
    }
    info = _common.header("north_star: the paper's MNIST setting", sizes)
    peak = _common.matmul_peak()
    print(f"measured f32 matmul peak: {peak / 1e12:.3f} TFLOP/s")

    rng = np.random.default_rng(0)
    x = (rng.random((args.n, args.side, args.side)) < 0.13).astype(np.float32)  # MNIST's ink density
    plan = jaxmem.kfold(args.n, args.folds, repeats=args.repeats, seed=0)
    cfg = models.model_config("mlp_vae", (args.side, args.side), hidden=args.hidden,
                              latent_dim=args.latent, binarize="none")
    factory = lambda s: models.from_config(cfg, seed=s)  # noqa: E731
    members = plan.num_models

    # ---- training: one jitted program for all members ------------------------------
    t0 = time.perf_counter()
    ens = ensemble.make(factory, optax.adam(1e-3), plan.keep, batch_size=args.batch_size)
    state = ens.init(0)
    data = jaxmem.mesh.replicate(jax.numpy.asarray(x), ens.mesh)
    _common.block(state)
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = ens.epoch(state, data)
    _common.block(metrics)
    t_first = time.perf_counter() - t0  # compile + one epoch
    per_epoch = []
    for _ in range(max(args.measure_epochs - 1, 1)):
        t0 = time.perf_counter()
        state, metrics = ens.epoch(state, data)
        _common.block(metrics)
        per_epoch.append(time.perf_counter() - t0)
    sec_epoch = float(np.median(per_epoch))
    compile_s = max(t_first - sec_epoch, 0.0)
    train_total = compile_s + args.epochs * sec_epoch
    d = args.side * args.side
    enc, dec = _common.mlp_vae_macs(d, args.hidden, args.latent)
    steps = ens.steps_per_epoch
    # FLOPs of an epoch as XLA counts them (training steps + the held-out evaluation every
    # epoch ends with), as ensemble_training.py counts them; an analytic count of the
    # matmuls where the backend has no cost analysis.
    flops_steps, flops_eval = _common.epoch_flops(ens, state, x, args.batch_size)
    if flops_steps is not None:
        train_flops_epoch, flops_basis = flops_steps + flops_eval, "XLA cost analysis"
    else:  # forward + both backward products, less the first layer's input gradient
        first = d * args.hidden[0]
        train_flops_epoch = (2.0 * (3 * (enc + dec) - first) * members * steps * args.batch_size
                             + 2.0 * (enc + dec) * int((~plan.keep).sum()))
        flops_basis = "analytic matmul count"
    print(f"\ntraining: init {t_init:.1f} s, compile ~{compile_s:.1f} s, {sec_epoch:.3f} s per epoch "
          f"of all {members} members ({steps} steps of {args.batch_size}), held-out loss "
          f"{float(np.nanmean(np.asarray(metrics['heldout_loss']))):.2f} nats")

    # ---- likelihood: S-sample IW log p of every (member, example) pair --------------
    from flax import nnx

    full = nnx.merge_state(state.params, state.rest)
    m_ex = min(args.measure_examples, args.n)
    score_mesh = jaxmem.make_mesh()
    kw = dict(key=jax.random.key(1), num_samples=args.samples, mesh=score_mesh,
              example_chunk=args.example_chunk, sample_chunk=args.sample_chunk, matmul_dtype=args.matmul_dtype)
    warm = min(m_ex, 512)
    t0 = time.perf_counter()
    _common.block(jaxmem.loglik_matrix(ens.graphdef, full, data[:warm], **kw))
    t_ll_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ll = _common.block(jaxmem.loglik_matrix(ens.graphdef, full, data[:m_ex], **kw))
    t_ll = time.perf_counter() - t0
    pairs_per_s = members * m_ex / t_ll
    ll_total = members * args.n / pairs_per_s
    ll_flops = 2.0 * (enc + args.samples * dec) * members * m_ex
    print(f"likelihood ({args.matmul_dtype} matmuls): {m_ex} examples x {members} members x S={args.samples} "
          f"in {t_ll:.2f} s "
          f"({pairs_per_s:,.0f} pairs/s; first call incl. compile {t_ll_first:.1f} s); "
          f"mean ll {float(np.mean(np.asarray(ll))):.2f} nats")

    scores_t0 = time.perf_counter()
    s = jaxmem.memorization_scores(np.asarray(ll), plan.keep[:, :m_ex]) if m_ex == args.n else None
    scores_s = time.perf_counter() - scores_t0 if s is not None else None

    total = t_init + train_total + t_ll_first + ll_total
    rows = [
        {"stage": "training (all members)", "measured_s": sec_epoch * len(per_epoch) + t_first,
         "projected_s": train_total, "TFLOP/s": train_flops_epoch / sec_epoch / 1e12,
         "of_peak": train_flops_epoch / sec_epoch / peak},
        {"stage": "likelihood (all pairs)", "measured_s": t_ll, "projected_s": ll_total,
         "TFLOP/s": ll_flops / t_ll / 1e12, "of_peak": ll_flops / t_ll / peak},
        {"stage": "whole setting", "measured_s": None, "projected_s": total,
         "TFLOP/s": None, "of_peak": None},
    ]
    _common.print_table(rows, ["stage", "measured_s", "projected_s", "TFLOP/s", "of_peak"],
                        title=f"the paper's MNIST setting on {info['device_kind']} "
                              f"(goal: whole setting < 600 s on one H100)")
    print(f"arithmetic: training {train_flops_epoch * args.epochs / 1e15:.2f} PFLOP ({flops_basis}), likelihood "
          f"{2.0 * (enc + args.samples * dec) * members * args.n / 1e15:.2f} PFLOP")
    _common.write_json("north_star", {
        "machine": info, "sizes": sizes, "matmul_peak_flops": peak,
        "init_s": t_init, "compile_s": compile_s, "sec_per_epoch": sec_epoch,
        "train_projected_s": train_total, "train_flops_per_epoch": train_flops_epoch,
        "train_flops_basis": flops_basis,
        "ll_measured_s": t_ll, "ll_pairs_per_s": pairs_per_s, "ll_projected_s": ll_total,
        "ll_first_call_s": t_ll_first, "scores_s": scores_s,
        "total_projected_s": total, "projection": args.measure_epochs < args.epochs or m_ex < args.n,
    })


if __name__ == "__main__":
    main()
