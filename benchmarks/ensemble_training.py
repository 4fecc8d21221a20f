"""Ensemble training: one jitted program for K members vs a JAX loop vs the paper's PyTorch loop.

The paper's MNIST setting: MLP VAE 1024-512-256, z = 16, 32x32 inputs, batch 64, Adam 1e-3,
K = 10 folds, so each member trains on 54,000 of 60,000 images (844 steps per epoch).
Data are random binary 32x32 images (timing only). To keep CPU runs short each variant
runs ``--steps`` steps per member on a subset sized so that one epoch is exactly that
many steps, and the time is extrapolated to a full member-epoch (844 steps + the held-out
evaluation, whose share of the work is the same at both sizes). GFLOP/s and fractions
of the peak count XLA's cost analysis of a member-epoch's work, the training steps and
the held-out evaluation (until the eighth session the evaluation's ~4% was left out),
the same count for every row, the PyTorch ones included.

  (a) ensemble   jaxmem.ensemble: K members in one scanned, jitted epoch, with the default
                 member_chunk (all K vmapped on accelerators; on a CPU, members a few at a
                 time, each chunk's state kept in cache for the epoch) and the default
                 mesh (on a CPU one device per core, as `jaxmem run` sets it up with
                 jaxmem.mesh.use_cpu_devices: the members split over the cores)
  (a') vmap-all  the same with all K members vmapped at every step (member_chunk=K);
                 printed only where it differs from (a)
  (b) jax-loop   the same members one after another, each a jitted scanned epoch (K = 1)
  (c) paper      the paper's own PyTorch code path, one fold after another: per-item
                 PIL transforms in a DataLoader, sigmoid + BCE loss, Adam, the held-out
                 loss each epoch (``_paper_torch``; skipped without torch)
  (d) torch lean a lean PyTorch per-fold loop: data already in one tensor, fused
                 BCE-with-logits, training steps only (no held-out pass)
  (e) (a), SGD   with ``--sgd``: program (a) with plain SGD instead of Adam (and (a)'s
                 member chunk), a diagnostic of how much of a step Adam's moment updates
                 take (not a target row)
  (f) ceiling    the training step's matrix products alone, at its shapes and layouts
                 (forward, kernel and input gradients of every layer at batch 64, one
                 member, scanned over the steps; nothing else but a row normalisation
                 of the [64, width] activations): the fastest a step can run with this
                 machine's matmuls at these shapes, so the ceiling of the 60% target
                 (a diagnostic, not a variant)
  (g) Adam floor the least memory traffic any Adam step needs: one pass that reads the
                 parameters, gradients and both moments and writes back the parameters
                 and moments (7 parameter-sized f32 streams), timed as a 3-stream pass
                 ``p + s * g`` over one member's parameter count and scaled by 7/3 (XLA's
                 CPU backend has no multi-output fusion, so optax's Adam makes 10 streams
                 in three passes). With (f) it bounds what (a) can reach: a step can be no
                 faster than its products plus this pass, whatever else it does
                 (a diagnostic, not a variant)

Targets (issue #3) are measured against (c), the paper's code; (d) is printed beside it
to show how much of the gap is the paper's data pipeline and loss rather than the
framework.

Run: python benchmarks/ensemble_training.py [--quick] [--steps 40] [--members 10] [--sgd]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402
from jaxmem import ensemble, membership, models  # noqa: E402
from jaxmem.mesh import make_mesh, use_cpu_devices  # noqa: E402

# As `jaxmem run` does, before JAX starts: on a CPU, one device per core, so program (a)
# splits its members over the cores (no effect on accelerators, or where XLA_FLAGS
# forces a device count). (b) runs each member on one device.
use_cpu_devices()

FULL_N = 60_000


def paper_available() -> bool:
    """Whether PyTorch (and so rows (c) and (d)) can run here."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_device() -> str:
    """PyTorch's device for rows (c) and (d), with every CPU core for its threads."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return "cuda" if torch.cuda.is_available() else "cpu"


def paper_loop(keep: np.ndarray, hidden, latent, batch, steps, lr) -> float:
    """Seconds for ``steps`` steps + the held-out loss of every fold, the paper's code path.

    Each fold: a fresh model and Adam, ``steps`` batches from a shuffled loader over its
    training indices (per-item Pad/ToTensor/Binarize), then the loss over its held-out
    indices, as ``MarginalTrainer.fit`` does every epoch.
    """
    import torch

    import _paper_torch as paper  # main() calls this only when paper_available()

    dev = torch_device()
    data = paper.MNISTLike(paper.random_mnist_like(keep.shape[1]))
    warm = paper.BernoulliMLPVAE(hidden, latent).to(dev)  # thread pools, allocator, CUDA context
    paper.train_steps(warm, torch.optim.Adam(warm.parameters(), lr=lr),
                      paper.loader(data, np.arange(batch * 3), batch), 3, dev)
    _common.block(None)
    total = 0.0
    for m in range(keep.shape[0]):
        torch.manual_seed(m)
        model = paper.BernoulliMLPVAE(hidden, latent).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        t0 = time.perf_counter()
        paper.train_steps(model, opt, paper.loader(data, np.flatnonzero(keep[m]), batch), steps, dev)
        model.eval()
        with torch.no_grad():
            rows = paper.loader(data, np.flatnonzero(~keep[m]), batch)
            held_out = sum(model.step(x.to(dev)).item() for x, _, _ in rows)
        _common.block(None)
        total += time.perf_counter() - t0
        assert np.isfinite(held_out)
    return total


def torch_loop(x: np.ndarray, keep: np.ndarray, hidden, latent, batch, steps, lr) -> float:
    """Seconds for ``steps`` steps of every fold, one fold after another (lean PyTorch)."""
    import torch  # main() calls this only when paper_available()
    from torch import nn

    dev = torch_device()
    d = x.shape[1] * x.shape[2]

    def mlp(sizes):
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = mlp([d, *hidden, 2 * latent])
            self.dec = mlp([latent, *hidden[::-1], d])

        def forward(self, xb):
            h = self.enc(xb)
            mu, std = h[:, :latent], nn.functional.softplus(h[:, latent:]) + 1e-4
            z = mu + std * torch.randn_like(std)
            logits = self.dec(z)
            rec = nn.functional.binary_cross_entropy_with_logits(logits, xb, reduction="none").sum(1)
            kl = 0.5 * (mu**2 + std**2 - 1.0 - 2 * torch.log(std)).sum(1)
            return (rec + kl).mean()

    data = torch.from_numpy(x.reshape(len(x), d)).to(dev)
    # Warm up (CUDA context, cuBLAS handles, thread pools, allocator) with a throwaway
    # model, as the JAX rows are warmed up by compiling first: only steady-state steps
    # are timed and extrapolated. Each member's own first step (a fresh model and Adam
    # state, as the paper's per-fold loop has) stays in its timing.
    warm = VAE().to(dev)
    warm_opt = torch.optim.Adam(warm.parameters(), lr=lr)
    for _ in range(3):
        loss = warm(data[:batch])
        warm_opt.zero_grad()
        loss.backward()
        warm_opt.step()
    _common.block(None)
    total = 0.0
    for m in range(keep.shape[0]):
        torch.manual_seed(m)
        model = VAE().to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        train = torch.from_numpy(np.flatnonzero(keep[m])).to(dev)
        t0 = time.perf_counter()
        perm = train[torch.randperm(len(train), device=dev)]
        for s in range(steps):
            idx = perm[(s * batch) % len(perm):][:batch]
            loss = model(data[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        _common.block(None)
        total += time.perf_counter() - t0
    return total


def matmul_ceiling_fn(d: int, hidden, latent: int, batch: int, steps: int):
    """Row (f): ``(function, its FLOPs)`` for ``steps`` steps of the VAE step's products alone.

    The same products, shapes and dimension layouts as one member's training step
    (``models._latent.dense``: forward ``h @ W``; kernel gradient ``h^T g`` as
    ``[in, out]``; input gradient ``(W g^T)^T``, none for the encoder's input), in a
    ``lax.scan``; each step's weights are the previous step's kernel gradients, so no
    product is loop-invariant, and each activation and gradient row is rescaled to unit
    RMS (work of the activations' size, ``[batch, width]``, not the weights') so that
    the values stay finite. FLOPs: 2 per multiply-accumulate of the products.
    """
    enc_layers, dec_layers = _common.mlp_vae_layers(d, hidden, latent)
    shapes = enc_layers + dec_layers
    n_enc = len(enc_layers)
    key = jax.random.key(0)
    ws = [jax.random.normal(jax.random.fold_in(key, i), s) / np.sqrt(s[0]) for i, s in enumerate(shapes)]
    x = jax.random.normal(jax.random.fold_in(key, len(shapes)), (batch, d))
    norm = lambda h: h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)  # noqa: E731
    kernel_grad = lambda h, g: jax.lax.dot_general(h, g, (((0,), (0,)), ((), ())))  # noqa: E731
    input_grad = lambda w, g: jax.lax.dot_general(w, g, (((1,), (1,)), ((), ()))).T  # noqa: E731

    def step(ws, _):
        hs, h = [], x
        for i, w in enumerate(ws):
            if i == n_enc:  # the decoder starts from z, half the encoder's output
                h = h[:, :latent]
            hs.append(h)
            h = norm(h @ w)
        g, grads = h, [None] * len(ws)
        for i in reversed(range(len(ws))):
            grads[i] = kernel_grad(hs[i], g)
            if i == 0:
                break
            g = norm(input_grad(ws[i], g))
            if i == n_enc:  # back into the encoder's 2 * latent outputs
                g = jnp.concatenate([g, jnp.zeros_like(g)], axis=1)
        return grads, None

    run = jax.jit(lambda ws: jax.lax.scan(step, ws, None, length=steps)[0])
    macs = sum(a * b for a, b in shapes)
    flops = steps * 2 * batch * (3 * macs - enc_layers[0][0] * enc_layers[0][1])
    return (lambda: run(ws)), flops


def adam_floor_fn(n_params: int, steps: int, min_passes: int = 64):
    """Row (g): ``(function, its streamed bytes)``, ``steps`` passes of ``p + s * g``.

    ``p`` and ``g`` are float32 vectors of ``n_params`` (one member's parameters); each
    pass reads both and writes ``p`` (3 streams of ``4 * n_params`` bytes), with a scale
    ``s`` that changes per pass so that no pass is loop-invariant. Its time times 7/3 is
    the memory floor of a one-pass Adam step (read p, g, mu, nu; write p, mu, nu). ``p``
    is donated and updated in place, as an optimizer's state is, so fresh buffers' page
    faults are not timed. The scan runs at least ``min_passes`` passes (a few passes'
    time is mostly dispatch) and the function times itself, returning the seconds of
    ``steps`` passes. The floor errs low, so the bound it gives errs high (toward the
    target): two vectors may stay in a large last-level cache where Adam's four cannot
    (the paper's VAE: 27 MB against 55 MB, with a 32 MiB L3 on the EPYC).
    """
    passes = max(steps, min_passes)
    key = jax.random.key(1)
    g = jax.random.normal(jax.random.fold_in(key, 1), (n_params,))

    def step(p, i):
        return p + (1e-3 / (1.0 + i.astype(jnp.float32))) * g, None

    run = jax.jit(lambda p: jax.lax.scan(step, p, jnp.arange(passes))[0], donate_argnums=0)
    buf = [jax.random.normal(key, (n_params,))]

    def call() -> float:
        t0 = time.perf_counter()
        buf[0] = jax.block_until_ready(run(buf[0]))
        return (time.perf_counter() - t0) * steps / passes

    return call, 3 * 4 * n_params * steps


def add_problem_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """The arguments of :func:`problem` (shared with ``profile_training.py``)."""
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per member")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 512, 256])
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--unroll", type=int, default=1, help="lax.scan unroll of the epoch loop")


def problem(args: argparse.Namespace):
    """The timed problem: ``(keep, steps, x, factory)``.

    A K-fold plan over a subset sized so that every member's epoch is exactly
    ``args.steps`` steps of ``args.batch`` (``steps`` may round up by one), random binary
    32x32 images ``x`` (numpy), and the paper's MLP VAE factory.
    """
    k, batch = args.members, args.batch
    n = int(args.steps * batch * k / (k - 1))
    n -= n % k
    keep = membership.kfold(n, k).keep
    steps = math.ceil(keep.sum(1).max() / batch)
    x = (np.random.default_rng(0).random((n, 32, 32)) < 0.5).astype(np.float32)
    factory = lambda s: models.create(  # noqa: E731
        "mlp_vae", (32, 32), seed=s, hidden=args.hidden, latent_dim=args.latent)
    return keep, steps, x, factory


def one_program_and_loop(factory, tx, keep: np.ndarray, args: argparse.Namespace):
    """Programs (a) and (b): ``(ens, single)``.

    ``ens`` trains every member of ``keep`` in one jitted epoch. ``single`` is one member's
    epoch on one device: every member's program has the same shapes (equal fold sizes),
    so the sequential JAX loop (b) compiles it once and runs it K times, each member with
    its own initial state (``single.init(m)``).
    """
    ens = ensemble.make(factory, tx, keep, batch_size=args.batch, unroll=args.unroll)
    single = ensemble.make(factory, tx, keep[:1], batch_size=args.batch, mesh=make_mesh(1), unroll=args.unroll)
    return ens, single


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_problem_args(ap, steps=40)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best of each)")
    ap.add_argument("--quick", action="store_true", help="5 steps, 1 round, for development")
    ap.add_argument("--sgd", action="store_true", help="add row (e): program (a) with SGD instead of Adam")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 5, 1
    k, batch, lr = args.members, args.batch, 1e-3
    full_steps = math.ceil(FULL_N * (k - 1) / k / batch)  # 844 for K=10, batch 64
    keep, steps, x, factory = problem(args)
    n = keep.shape[1]
    info = _common.header(
        "ensemble_training",
        {"members": k, "timed_steps_per_member": steps, "subset_n": n, "full_n": FULL_N,
         "full_steps_per_member_epoch": full_steps, "unroll": args.unroll, "rounds": args.rounds,
         "hidden": args.hidden, "latent": args.latent, "batch": batch},
    )
    scale = full_steps / steps  # extrapolation factor to a full member-epoch
    fns, peak_flops = _common.matmul_peak_fns("peak")

    # (a) one program for all members; (b) one member's program, run for each in turn
    ens, single = one_program_and_loop(factory, optax.adam(lr), keep, args)
    state = ens.init(0)
    xd = jax.device_put(x)
    local = -(-k // ens.mesh.size)
    # FLOPs of an epoch as XLA counts them: training steps and the held-out evaluation
    # every epoch ends with (_common.epoch_flops); scaled to a full member-epoch below.
    flops_train, flops_eval = _common.epoch_flops(ens, state, x, batch)
    flops_a = flops_train + flops_eval if flops_train else None
    flops_b = flops_a / k if flops_a else None
    print(f"FLOPs per epoch, all members: training steps {flops_train:.4g}, held-out evaluation "
          f"{flops_eval:.4g} ({flops_eval / flops_a:.1%})" if flops_a else "FLOPs: no cost analysis here")
    fns["a"] = lambda: ens.epoch(state, xd)
    chunk = ens.member_chunk(state)
    print(f"(a) trains {chunk} of each device's {local} members at a time (member_chunk=None)")
    if chunk < local:  # (a') every member vmapped at every step
        ens_all = ensemble.make(factory, optax.adam(lr), keep, batch_size=batch, unroll=args.unroll, member_chunk=k)
        state_all = ens_all.init(0)
        fns["a'"] = lambda: ens_all.epoch(state_all, xd)
    if args.sgd:  # (e) the same program without Adam's moments
        # with (a)'s chunk: SGD's smaller state could make the default chunk another one
        ens_sgd = ensemble.make(factory, optax.sgd(lr), keep, batch_size=batch, unroll=args.unroll,
                                member_chunk=chunk)
        state_sgd = ens_sgd.init(0)
        fns["e"] = lambda: ens_sgd.epoch(state_sgd, xd)

    # (b) the same members one after another, each a jitted scanned epoch
    states = [single.init(m) for m in range(k)]
    fns["b"] = lambda: [single.epoch(s, xd) for s in states]
    # (f) the ceiling: one member's step products alone (timed per member, like (b))
    fns["f"], flops_f = matmul_ceiling_fn(x.shape[1] * x.shape[2], args.hidden, args.latent, batch, steps)
    # (g) the memory floor of a one-pass Adam step over one member's parameters
    n_params = sum(leaf.size for leaf in jax.tree.leaves(state.params)) // k
    fns["g"], bytes_g3 = adam_floor_fn(n_params, steps)

    # (c) the paper's code path, fold after fold (training steps + held-out loss), and
    # (d) lean PyTorch (training steps only: no held-out pass, which favours it); both time
    # themselves, leaving out the construction of each fold's fresh model.
    if paper_available():
        fns["c"] = lambda: paper_loop(keep, args.hidden, args.latent, batch, steps, lr)
        fns["d"] = lambda: torch_loop(x, keep, args.hidden, args.latent, batch, steps, lr)
    else:
        print("torch is not installed: rows (c) and (d) skipped (pip install torch==2.13.0)")

    best = _common.interleaved_best(fns, rounds=args.rounds)
    parts = _common.peak_parts(best, peak_flops, "peak")
    peak = max(parts.values())
    print(f"f32 matmul peak (best of {args.rounds} interleaved rounds): {peak / 1e9:.1f} GFLOP/s ("
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items()) + ")")
    per = {name: best[name] / (1 if name in "fg" else k) * scale for name in fns if not name.startswith("peak")}
    per["g"] *= 7 / 3  # the 3-stream pass's time at 7 streams: a one-pass Adam's traffic
    per_a, per_b, per_c = per["a"], per["b"], per.get("c")
    labels = {"a": "(a) ensemble, one program", "a'": "(a') one program, all K vmapped",
              "b": "(b) JAX loop over members", "c": "(c) the paper's PyTorch code", "d": "(d) lean PyTorch loop",
              "e": "(e) (a) with SGD, not Adam", "f": "(f) ceiling: the step's matmuls alone",
              "g": "(g) one-pass Adam's memory floor"}
    rows = [{"variant": labels[name], "s_per_member_epoch": secs,
             "GFLOP/s": (flops_f if name == "f" else flops_b) * scale / secs / 1e9 if flops_b and name != "g" else None}
            for name, secs in per.items()]
    for r in rows:
        r["fraction_of_peak"] = r["GFLOP/s"] * 1e9 / peak if r["GFLOP/s"] else None
        r["of_xla_peak"] = r["GFLOP/s"] * 1e9 / parts["xla"] if r["GFLOP/s"] else None
        r["a_speedup"] = r["s_per_member_epoch"] / per_a if r["s_per_member_epoch"] else None
    _common.print_table(rows, ["variant", "s_per_member_epoch", "GFLOP/s", "fraction_of_peak", "of_xla_peak",
                               "a_speedup"],
                        title=f"seconds per member-epoch (extrapolated to n={FULL_N}, K={k}); "
                              "a_speedup = this row's time / (a)'s")
    targets = {
        "a_vs_paper_ge_2x": (per_c / per_a >= 2.0) if per_c else None,
        "a_at_least_as_fast_as_b": per_a <= per_b,
        "a_ge_60pct_peak": (rows[0]["fraction_of_peak"] or 0) >= 0.6,
    }
    if info["backend"] != "cpu":
        targets["a_vs_b_ge_5x"] = per_b / per_a >= 5.0
    print("targets:", targets)
    ceiling = next(r for r in rows if r["variant"].startswith("(f)"))
    print(f"ceiling of the 60% target on this machine: the step's matmuls alone ran at "
          f"{ceiling['fraction_of_peak']:.0%} of the peak ((f)); (a) ran at "
          f"{ceiling['s_per_member_epoch'] / per_a:.0%} of (f)'s speed")
    bandwidth = bytes_g3 / best["g"]
    # the bound's times are the training steps' alone, so are its FLOPs
    bound = flops_train / k * scale / (per["f"] + per["g"]) / peak if flops_train else None
    if bound is not None:
        print(f"bound: a step that were its matmuls ((f)) plus one ideal Adam pass ((g), 7 streams of "
              f"{4 * n_params / 1e6:.1f} MB at the measured {bandwidth / 1e9:.0f} GB/s) would run at "
              f"{bound:.0%} of the peak; (a) ran at {rows[0]['fraction_of_peak']:.0%}")
    _common.write_json("ensemble_training", {
        "machine": info, "peak_flops": peak, "peak_parts_flops": parts,
        "sizes": vars(args) | {"subset_n": n, "steps": steps, "full_steps": full_steps},
        "rows": rows, "flops_per_epoch_a": flops_a, "flops_per_epoch_b_member": flops_b,
        "flops_per_epoch_training_steps": flops_train, "flops_per_epoch_heldout_eval": flops_eval,
        "flops_per_epoch_f": flops_f, "targets": targets, "n_params": n_params,
        "stream_bandwidth_bytes_per_s": bandwidth, "bound_f_plus_g_fraction_of_peak": bound,
    })


if __name__ == "__main__":
    main()
