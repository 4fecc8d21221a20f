"""Where a training step's time goes: the device trace of programs (a) and (b), by kernel.

A diagnostic to go with ``ensemble_training.py`` (not a benchmark of its own): it builds
the same two programs on the paper's MNIST VAE (1024-512-256, z = 16, batch 64, Adam
1e-3), (a) K members in one jitted epoch and (b) one member's epoch (run K times in the
JAX loop), runs one epoch of ``--steps`` steps of each under ``jax.profiler``, and prints
per step: the wall time, the device's busy time, the number of kernels (GPU) or XLA
thunks (CPU), and the kernels that take the most time, with XLA's names for them (the
fusions' names in the optimised HLO, which ``--hlo-dir`` writes out).

On a CPU the trace's thunk events nest (a fusion inside its while loop), so "busy" there
can exceed the wall time; the ranking by name is still the useful part.

Run: python benchmarks/profile_training.py [--members 10] [--steps 50] [--trace-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402
import ensemble_training  # noqa: E402


def kernel_table(trace_file: str, steps: int, top: int) -> dict:
    """Per-step device time by kernel name, from one ``*.trace.json.gz``.

    Device events are those of processes whose name names a GPU/TPU device; on a CPU
    (no such process) the XLA thunks of the host threads stand in, leaving out the
    profiler's and Python's own events.
    """
    with gzip.open(trace_file) as f:
        events = json.load(f)["traceEvents"]
    names = {e["pid"]: e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, nm in names.items() if re.search(r"/device:(GPU|TPU)", nm)}
    # a GPU trace also holds per-stream "XLA Ops" / "XLA Modules" lines: keep kernels only
    thread_names = {(e["pid"], e["tid"]): e["args"].get("name", "") for e in events
                    if e.get("ph") == "M" and e.get("name") == "thread_name"}

    def is_kernel(e):
        if e.get("ph") != "X":
            return False
        if device:
            tn = thread_names.get((e["pid"], e["tid"]), "")
            return e["pid"] in device and "XLA" not in tn and "Steps" not in tn
        n = e["name"]
        return not (n.startswith(("$", "ThunkExecutor", "PjRt", "Thunk", "TfrtCpu")) or "Await" in n)

    kern = [e for e in events if is_kernel(e)]
    tot, cnt = collections.Counter(), collections.Counter()
    for e in kern:
        name = re.sub(r"\.\d+$", "", e["name"])
        tot[name] += e["dur"]
        cnt[name] += 1
    busy_us = sum(tot.values())
    return {
        "device_processes": sorted(names[p] for p in device),
        "device_threads": sorted({tn for (pid, _), tn in thread_names.items() if pid in device}),
        "kernels_per_step": len(kern) / steps,
        "busy_ms_per_step": busy_us / 1e3 / steps,
        "top": [{"name": k[:100], "ms_per_step": v / 1e3 / steps, "calls_per_step": cnt[k] / steps,
                 "share": v / busy_us} for k, v in tot.most_common(top)],
    }


def profile(fn, steps: int, top: int, keep_dir: str | None, label: str) -> dict:
    """Warm ``fn`` up, time it, then trace one call of it."""
    _common.block(fn())
    t0 = time.perf_counter()
    _common.block(fn())
    wall = time.perf_counter() - t0
    d = tempfile.mkdtemp(prefix=f"jaxmem-prof-{label}-")
    jax.profiler.start_trace(d)
    _common.block(fn())
    jax.profiler.stop_trace()
    out = {"wall_ms_per_step": wall * 1e3 / steps}
    files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        out["error"] = f"no trace written under {d}"
    else:
        trace = max(files)
        out |= kernel_table(trace, steps, top)
        if keep_dir:
            os.makedirs(keep_dir, exist_ok=True)
            shutil.copy(trace, os.path.join(keep_dir, f"{label}.trace.json.gz"))
    shutil.rmtree(d, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ensemble_training.add_problem_args(ap, steps=50)
    ap.add_argument("--top", type=int, default=20, help="kernels listed per program")
    ap.add_argument("--trace-dir", default=None, help="copy each program's trace.json.gz here")
    ap.add_argument("--hlo-dir", default=None, help="write each program's optimised HLO here")
    ap.add_argument("--tag", default="", help="suffix of the JSON result's name (a variant's label)")
    args = ap.parse_args()
    k = args.members
    keep, steps, x_host, factory = ensemble_training.problem(args)
    info = _common.header("profile_training", {"members": k, "steps": steps, "batch": args.batch,
                                               "hidden": args.hidden, "latent": args.latent,
                                               "unroll": args.unroll, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")})
    x = jax.device_put(x_host)
    ens, single = ensemble_training.one_program_and_loop(factory, optax.adam(1e-3), keep, args)
    state, state1 = ens.init(0), single.init(0)
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
        for label, e, s in (("a", ens, state), ("b", single, state1)):
            text = jax.jit(e.epoch).lower(s, x).compile().as_text()
            with open(os.path.join(args.hlo_dir, f"epoch_{label}.hlo.txt"), "w") as f:
                f.write(text)
    res = {"a": profile(lambda: ens.epoch(state, x), steps, args.top, args.trace_dir, "a"),
           "b": profile(lambda: single.epoch(state1, x), steps, args.top, args.trace_dir, "b")}
    for label, r in res.items():
        what = f"({label}) {'all ' + str(k) + ' members' if label == 'a' else 'one member'}"
        print(f"\n{what}: wall {r['wall_ms_per_step']:.3f} ms/step; device busy "
              f"{r.get('busy_ms_per_step', float('nan')):.3f} ms/step in "
              f"{r.get('kernels_per_step', float('nan')):.1f} kernels/step")
        if "top" in r:
            _common.print_table(r["top"], ["name", "ms_per_step", "calls_per_step", "share"])
        else:
            print(r.get("error"))
    ratio = k * res["b"]["wall_ms_per_step"] / res["a"]["wall_ms_per_step"]
    print(f"\n(a) vs the JAX loop (b) per member-step, from these single epochs: {ratio:.2f}x")
    _common.write_json("profile_training" + (f"-{args.tag}" if args.tag else ""),
                       {"machine": info, "sizes": vars(args) | {"n": keep.shape[1], "steps": steps},
                        "a": res["a"], "b": res["b"], "a_vs_b": ratio})


if __name__ == "__main__":
    main()
