"""Shared benchmark plumbing: machine description, matmul peak, timing, tables, JSON.

Every benchmark script imports this module, so each one reports the same header
(backend, device kind, versions) and measures the same f32 matmul peak that its
achieved FLOP/s are compared against. The scripts run unchanged on CPU, GPU and TPU.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_info() -> dict[str, Any]:
    """Backend, device kind and count, CPU count, Python and library versions."""
    import importlib.metadata as md

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": ver("jaxlib"),
        "flax": ver("flax"),
        "optax": ver("optax"),
        "numpy": np.__version__,
        "torch": ver("torch"),
        "statsmodels": ver("statsmodels"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def block(x: Any) -> Any:
    """Wait for every array leaf of ``x`` (jax or torch) to be computed."""
    for leaf in jax.tree.leaves(x):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    try:  # torch on GPU is asynchronous too
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass
    return x


def timeit(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, min_time: float = 0.0) -> float:
    """Best wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        block(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        best = min(best, time.perf_counter() - t0)
        if min_time and best > min_time:
            break
    return best


def interleaved_best(fns: dict[str, Callable[[], Any]], *, rounds: int = 3, warmup: int = 1) -> dict[str, float]:
    """Best wall-clock seconds of each ``fns[name]()``, timed in interleaved rounds.

    Every function is warmed up, then each round times every function once, in turn; the
    result is each one's fastest round. On a shared machine whose speed drifts over
    minutes, interleaving puts the implementations being compared under the same
    conditions, where timing one after the other would hand one of them the slow spell.
    A function that returns a Python float has timed itself: that number is used instead
    of its wall time (for loops that must leave set-up work, such as building fresh
    models, out of the timing).
    """
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = block(fn())
            secs = out if isinstance(out, float) else time.perf_counter() - t0
            best[name] = min(best[name], secs)
    return best


def matmul_peak(size: int | None = None, dtype=jnp.float32, repeats: int = 5) -> float:
    """Measured f32 matmul FLOP/s of the default device (square products, best of ``repeats``).

    ``size`` defaults to 2048 on CPU and 8192 on accelerators. Uses
    ``precision="highest"`` off-CPU so that the peak is true-f32 (not TF32/bf16) — the
    same precision the f32 kernels it is compared with are asked to use by default. On
    CPUs the faster of XLA's product and the host BLAS's (:func:`matmul_peak_fns`).
    """
    fns, flops = matmul_peak_fns("peak", size, dtype)
    return max(flops / timeit(fn, repeats=repeats, warmup=2) for fn in fns.values())


def matmul_peak_fns(name: str = "peak", size: int | None = None,
                    dtype=jnp.float32) -> tuple[dict[str, Callable[[], Any]], float]:
    """The products the peak is timed on, as ``({label: function}, FLOPs of each)``.

    ``{name: XLA's product}``, and on CPUs for float32 also ``{name + HOST_BLAS: numpy's
    product}`` (the BLAS numpy links, OpenBLAS in the PyPI wheels): the peak is the
    faster of the two (:func:`peak_of`), so that utilisation is reported against the
    fastest f32 product measured on the machine, not against XLA's alone. (On a 2-core
    AMD EPYC, Zen 3, numpy's 2048-cube product ran at 186 GFLOP/s against XLA's
    150-171: ``benchmarks/RESULTS.md``, twelfth session.)
    """
    size = size or (2048 if jax.default_backend() == "cpu" else 8192)
    fns = {name: _peak_product(size, dtype)}
    if jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32:
        a, b = np.random.default_rng(0).standard_normal((2, size, size), dtype=np.float32)
        fns[name + HOST_BLAS] = lambda: a @ b
    return fns, 2.0 * size**3


#: Label suffix of the peak product computed by numpy's BLAS (:func:`matmul_peak_fns`).
HOST_BLAS = " (numpy BLAS)"


def peak_of(best: dict[str, float], flops: float, name: str = "peak") -> float:
    """FLOP/s of the fastest of :func:`matmul_peak_fns`'s products, from best times ``best``."""
    return max(peak_parts(best, flops, name).values())


def peak_parts(best: dict[str, float], flops: float, name: str = "peak") -> dict[str, float]:
    """FLOP/s of each of :func:`matmul_peak_fns`'s products: ``{"xla": ..., "host_blas": ...}``
    (the second on CPUs only)."""
    parts = {"xla": flops / best[name]}
    if name + HOST_BLAS in best:
        parts["host_blas"] = flops / best[name + HOST_BLAS]
    return parts


def _peak_product(size: int, dtype) -> Callable[[], Any]:
    """A ``size``-cube XLA product of ``dtype`` (bf16: float32 accumulation and result, as
    ``loglik_matrix(matmul_dtype="bfloat16")`` does)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (size, size), dtype)
    b = jax.random.normal(k2, (size, size), dtype)
    out = jnp.float32 if jnp.dtype(dtype) == jnp.bfloat16 else None
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision="highest", preferred_element_type=out))
    return lambda: f(a, b)


def flops_of(compiled) -> float | None:
    """FLOPs from a compiled XLA program's cost analysis (exact for dense matmuls)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    return float(cost.get("flops", 0.0)) or None


def epoch_flops(ens, state, x, batch: int) -> tuple[float | None, float]:
    """XLA-counted FLOPs of one epoch of ``ens.epoch`` (all members): ``(training, held_out)``.

    XLA's cost analysis counts a while-loop body once, not once per trip, so the training
    FLOPs are those of one compiled ``ens.step`` (all members; per device, so times the mesh
    size) times the steps per epoch, and the held-out FLOPs those of the model's loss on one
    chunk of ``batch`` examples, per example, times the held-out examples of all members
    (padding slots of the last chunk not counted): the evaluation every epoch ends with.
    ``training`` is None where the backend has no cost analysis. ``x``: the data,
    ``[examples, ...]`` (host or device).
    """
    from flax import nnx

    from jaxmem import ensemble

    batch0 = x[np.asarray(ens.schedule(state))[:, 0]]
    step_flops = flops_of(ens.step.lower(state, batch0).compile())
    gd, st = nnx.split(ensemble.member(ens.graphdef, state, 0))
    loss = jax.jit(lambda st, b, key: nnx.merge(gd, st).loss(b, key))  # one held-out chunk
    chunk_flops = flops_of(loss.lower(st, x[:batch], jax.random.key(0)).compile())
    train = step_flops * ens.steps_per_epoch * ens.mesh.size if step_flops else None
    held_out = chunk_flops / batch * int((~ens.keep).sum()) if chunk_flops else 0.0
    return train, held_out


def mlp_vae_layers(d: int, hidden, latent: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(in, out)`` of every dense layer of an MLP VAE, as ``(encoder, decoder)`` lists.

    Encoder ``d -> hidden -> 2 * latent``, decoder ``latent -> reversed(hidden) -> d``
    (``jaxmem.models.MLPVAE``).
    """
    enc = [d, *hidden, 2 * latent]
    dec = [latent, *reversed(list(hidden)), d]
    return list(zip(enc[:-1], enc[1:])), list(zip(dec[:-1], dec[1:]))


def mlp_vae_macs(d: int, hidden, latent: int) -> tuple[int, int]:
    """Multiply-accumulates of one example through an MLP VAE's encoder and decoder
    (the layers of :func:`mlp_vae_layers`); FLOPs are twice these."""
    return tuple(sum(a * b for a, b in layers) for layers in mlp_vae_layers(d, hidden, latent))


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str = "") -> None:
    """Print rows as a fixed-width table (numbers to 4 significant digits)."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def header(name: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """Print and return the machine description and problem sizes for a benchmark."""
    info = machine_info()
    print(f"# {name}")
    print(
        f"backend={info['backend']} device_kind={info['device_kind']} devices={info['num_devices']} "
        f"cpus={info['cpu_count']} python={info['python']} jax={info['jax']} flax={info['flax']} "
        f"numpy={info['numpy']} torch={info['torch']}"
    )
    print("sizes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    return info


def write_json(name: str, payload: dict[str, Any]) -> str:
    """Write ``payload`` to ``benchmarks/results/<name>-<backend>.json`` and return the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}-{jax.default_backend()}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    print(f"\nwrote {path}")
    return path
