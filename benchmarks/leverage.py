"""Leverage and closed-form LOO diagnostics: jaxmem vs numpy LAPACK vs statsmodels.

Three parts, one run:
  1. streamed leverage at n = 1e7, p = 100 (X generated block by block from a seed, never
     whole: it would be 4 GB) with the process's peak RSS — run first, so that peak is its own;
  2. leverage at n = 1e3 .. 1e6, p = 50: jaxmem (Cholesky, float32 and float64) vs numpy
     Cholesky (np.linalg.cholesky + scipy's LAPACK trsm) and numpy QR, vs statsmodels
     (OLS fit + OLSInfluence.hat_matrix_diag, float64), with jaxmem's FLOP/s against the
     measured matmul peak (FLOPs counted analytically: Gram n p^2 + Cholesky p^3/3 +
     triangular solve n p^2);
  3. external studentized residuals + DFBETAS at n = 2,000 and 5,000 (p = 10): jaxmem's
     closed form vs statsmodels' leave-one-out refit loop.

Usage: python benchmarks/leverage.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import scipy.linalg  # noqa: E402
import statsmodels.api as sm  # noqa: E402
from statsmodels.stats.outliers_influence import OLSInfluence  # noqa: E402

import _common as C  # noqa: E402
import jaxmem.linear as jl  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def numpy_cholesky_leverage(X):
    L = np.linalg.cholesky(X.T @ X)
    Z = scipy.linalg.solve_triangular(L, X.T, lower=True, check_finite=False)
    return np.einsum("ij,ij->j", Z, Z)


def numpy_qr_leverage(X):
    Q = np.linalg.qr(X, mode="reduced")[0]
    return np.einsum("ij,ij->i", Q, Q)


def statsmodels_leverage(X, y):
    return OLSInfluence(sm.OLS(y, X).fit()).hat_matrix_diag


def streamed_part(n, p, block_rows):
    nb = -(-n // block_rows)

    def block(b):
        rows = min(block_rows, n - b * block_rows)
        rng = np.random.default_rng([1234, b])  # block b is the same on both passes
        xb = rng.standard_normal((rows, p), dtype=np.float32)
        xb[:, 0] = 1.0  # an intercept column
        return xb

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    h = jl.leverage_streamed(block, num_blocks=nb)
    secs = time.perf_counter() - t0
    rss1 = peak_rss_mb()
    # Generating the blocks (twice) is part of the time: measure it alone.
    t0 = time.perf_counter()
    for b in range(nb):
        block(b)
    gen = time.perf_counter() - t0
    row = {
        "n": n,
        "p": p,
        "block_rows": block_rows,
        "seconds": secs,
        "generate_s_per_pass": gen,
        "peak_rss_before_mb": rss0,
        "peak_rss_after_mb": rss1,
        "X_if_materialized_mb": n * p * 4 / 2**20,
        "h_output_mb": h.nbytes / 2**20,
        "sum_h_minus_p": float(h.sum(dtype=np.float64) - p),
        "max_h": float(h.max()),
    }
    return row


def leverage_part(ns, p, peak, sm_max_n):
    rows = []
    for n in ns:
        rng = np.random.default_rng(n)
        X64 = rng.standard_normal((n, p))
        X64[:, 0] = 1.0
        y64 = X64 @ rng.standard_normal(p) + rng.standard_normal(n)
        X32 = X64.astype(np.float32)
        reps = 5 if n <= 100_000 else 2
        xj32 = jnp.asarray(X32)  # device-resident input, as in a JAX program
        with jax.enable_x64(True):
            xj64 = jnp.asarray(X64)
        t_j32 = C.timeit(lambda: jl.leverage(xj32), repeats=reps)
        t_j64 = C.timeit(lambda: jl.leverage(xj64, dtype=jnp.float64), repeats=reps)
        t_nc32 = C.timeit(lambda: numpy_cholesky_leverage(X32), repeats=reps)
        t_nc64 = C.timeit(lambda: numpy_cholesky_leverage(X64), repeats=reps)
        t_nq64 = C.timeit(lambda: numpy_qr_leverage(X64), repeats=reps)
        t_sm = None
        if n <= sm_max_n:
            t_sm = C.timeit(lambda: statsmodels_leverage(X64, y64), repeats=1 if n >= 1e5 else 3)
        # Sanity: all agree (float64 vs numpy QR).
        with jax.enable_x64(True):
            err = float(np.max(np.abs(np.asarray(jl.leverage(xj64, dtype=jnp.float64)) - numpy_qr_leverage(X64))))
        flops = 2.0 * n * p * p + p**3 / 3.0
        rows.append(
            {
                "n": n,
                "jaxmem_f32_ms": 1e3 * t_j32,
                "numpy_chol_f32_ms": 1e3 * t_nc32,
                "jaxmem/np_chol_f32": t_j32 / t_nc32,
                "jaxmem_f64_ms": 1e3 * t_j64,
                "numpy_chol_f64_ms": 1e3 * t_nc64,
                "jaxmem/np_chol_f64": t_j64 / t_nc64,
                "numpy_qr_f64_ms": 1e3 * t_nq64,
                "statsmodels_ms": None if t_sm is None else 1e3 * t_sm,
                "sm/jaxmem_f32": None if t_sm is None else t_sm / t_j32,
                "sm/jaxmem_f64": None if t_sm is None else t_sm / t_j64,
                "jaxmem_f32_GFLOPs": flops / t_j32 / 1e9,
                "pct_of_peak": 100 * flops / t_j32 / peak,
                "max_abs_err_f64": err,
            }
        )
    return rows


def diagnostics_part(ns, p):
    rows = []
    for n in ns:
        rng = np.random.default_rng(n + 1)
        X = rng.standard_normal((n, p))
        X[:, 0] = 1.0
        y = X @ rng.standard_normal(p) + rng.standard_normal(n)

        def sm_run():
            inf = OLSInfluence(sm.OLS(y, X).fit())
            return inf.resid_studentized_external, inf.dfbetas  # the LOO refit loop

        t0 = time.perf_counter()
        t_sm_ext, sm_dfb = sm_run()
        t_sm = time.perf_counter() - t0
        with jax.enable_x64(True):
            xj, yj = jnp.asarray(X), jnp.asarray(y)
        t_j64 = C.timeit(lambda: jl.influence(xj, yj, dtype=jnp.float64), repeats=5)
        xj32, yj32 = jnp.asarray(X.astype(np.float32)), jnp.asarray(y.astype(np.float32))
        t_j32 = C.timeit(lambda: jl.influence(xj32, yj32), repeats=5)
        got = jl.influence(X, y, dtype=jnp.float64)
        rel = max(
            float(np.max(np.abs(np.asarray(got.studentized_external) - t_sm_ext) / np.abs(t_sm_ext).max())),
            float(np.max(np.abs(np.asarray(got.dfbetas) - sm_dfb) / np.abs(sm_dfb).max())),
        )
        rows.append(
            {
                "n": n,
                "p": p,
                "statsmodels_s": t_sm,
                "jaxmem_f64_ms": 1e3 * t_j64,
                "jaxmem_f32_ms": 1e3 * t_j32,
                "sm/jaxmem_f64": t_sm / t_j64,
                "sm/jaxmem_f32": t_sm / t_j32,
                "max_rel_diff_vs_sm": rel,
            }
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for development")
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    if args.quick:
        stream_n, lev_ns, diag_ns = 1_000_000, [1_000, 10_000, 100_000], [500, 1_000]
    else:
        stream_n, lev_ns, diag_ns = 10_000_000, [1_000, 10_000, 100_000, 1_000_000], [2_000, 5_000]
    p_lev, p_stream, p_diag, sm_max_n = 50, 100, 10, 1_000_000
    info = C.header(
        "leverage",
        {"stream_n": stream_n, "p_stream": p_stream, "lev_ns": lev_ns, "p": p_lev,
         "diag_ns": diag_ns, "p_diag": p_diag},
    )

    stream = streamed_part(stream_n, p_stream, block_rows=131_072)
    C.print_table(
        [stream],
        ["n", "p", "seconds", "generate_s_per_pass", "peak_rss_after_mb", "X_if_materialized_mb", "h_output_mb",
         "sum_h_minus_p"],
        title="1. streamed leverage (X generated per block from a seed; peak RSS of the whole process)",
    )

    peak = C.matmul_peak()
    print(f"\nmatmul peak (f32): {peak / 1e9:.1f} GFLOP/s")
    lev = leverage_part(lev_ns, p_lev, peak, sm_max_n)
    C.print_table(
        lev,
        [
            "n",
            "jaxmem_f32_ms",
            "numpy_chol_f32_ms",
            "jaxmem/np_chol_f32",
            "jaxmem_f64_ms",
            "numpy_chol_f64_ms",
            "jaxmem/np_chol_f64",
            "numpy_qr_f64_ms",
            "statsmodels_ms",
            "sm/jaxmem_f32",
            "sm/jaxmem_f64",
            "jaxmem_f32_GFLOPs",
            "pct_of_peak",
            "max_abs_err_f64",
        ],
        title=f"2. leverage, p = {p_lev} (jaxmem: Cholesky, device-resident input; "
              "statsmodels: OLS fit + hat_matrix_diag, float64)",
    )
    diag = diagnostics_part(diag_ns, p_diag)
    C.print_table(
        diag,
        ["n", "p", "statsmodels_s", "jaxmem_f64_ms", "jaxmem_f32_ms", "sm/jaxmem_f64", "sm/jaxmem_f32",
         "max_rel_diff_vs_sm"],
        title="3. external studentized residuals + DFBETAS: closed form vs statsmodels' LOO refit loop",
    )
    C.write_json(
        "leverage",
        {"machine": info, "quick": args.quick, "matmul_peak_flops": peak, "streamed": stream, "leverage": lev,
         "diagnostics": diag},
    )


if __name__ == "__main__":
    main()
