"""Is memorization just leverage? Linear closed form vs a deep ensemble, on real digits.

Three per-example numbers for scikit-learn's handwritten 8x8 digits (64 pixel features):

* leverage ``h_i`` of the design ``[1, X]``: the linear baseline (hat-matrix diagonal);
* the closed-form leave-one-out log density ratio of a multivariate Gaussian fitted by
  maximum likelihood (``jaxmem.linear.loo_log_density_ratio_gaussian``): the
  memorization score of the simplest density model, exact, no refits;
* the memorization score ``M = U - V`` of a K-fold ensemble of MLP VAEs
  (``jaxmem.memorization``), nats.

For the Gaussian, ``M`` is a monotone function of ``h`` (``h_i = 1/n + d_i`` with ``d_i``
the scaled Mahalanobis distance), so its rank correlation with leverage is exactly 1:
for linear-Gaussian models memorization *is* leverage. The printed correlations show how
far the deep model's score is from that.

Run:  python examples/memorization_vs_leverage.py [--folds 5 --epochs 40 --figure out.png]
"""

from __future__ import annotations

import argparse

import numpy as np

from jaxmem import linear
from jaxmem.data import load_dataset
from jaxmem.pipeline import memorization
from jaxmem.report import plot_memorization_vs_leverage, spearman_correlation


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="digits used (default: all 1,797)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 128])
    p.add_argument("--samples", type=int, default=64, help="importance samples per log p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", default=None, help="write the deep M vs leverage plot here (PNG)")
    args = p.parse_args(argv)

    data = load_dataset("digits", limit=args.limit, binarize="dynamic")
    n = len(data)
    X = data.x.reshape(n, -1).astype(np.float64)

    # Leverage of [1, X]; always-blank pixels make X rank deficient, which leverage
    # handles as a pseudo-inverse (projection onto the retained column space).
    h = np.asarray(linear.leverage(np.c_[np.ones(n), X], dtype=np.float64))
    # The Gaussian needs a nonsingular covariance: drop the pixels that never vary.
    varying = X.std(axis=0) > 0
    gauss = linear.loo_log_density_ratio_gaussian(X[:, varying], dtype=np.float64)
    M_gauss = np.asarray(gauss.score)

    deep = memorization(
        data.x, data.y, model="mlp_vae",
        model_options={"hidden": args.hidden, "latent_dim": 8}, folds=args.folds,
        repeats=args.repeats, epochs=args.epochs, num_samples=args.samples, seed=args.seed,
        progress=False, linear_baseline=False,
    )
    M_deep = np.asarray(deep.M, np.float64)

    # Rows with h_i = 1 (a pixel lit in that digit only) have no LOO Gaussian: NaN.
    ok = np.isfinite(M_gauss)
    rho = {
        "gaussian_vs_leverage": spearman_correlation(M_gauss[ok], h[ok]),
        "deep_vs_leverage": spearman_correlation(M_deep, h),
        "deep_vs_gaussian": spearman_correlation(M_deep[ok], M_gauss[ok]),
    }
    top = max(1, n // 20)  # the 5% most memorized by each score
    top_deep = set(np.argsort(-M_deep)[:top])
    top_lev = set(np.argsort(-h)[:top])
    overlap = len(top_deep & top_lev) / top

    print(f"{n} digits, {int(varying.sum())} varying pixels; deep ensemble: {args.folds} folds "
          f"x {args.repeats} repeat(s) of an MLP VAE {args.hidden}, {args.epochs} epochs")
    if (~ok).any():
        print(f"({int((~ok).sum())} digit(s) with leverage 1 have no LOO Gaussian and are left out)")
    print("\nSpearman rank correlations")
    print(f"  Gaussian closed-form M  vs leverage:    {rho['gaussian_vs_leverage']:+.3f}")
    print(f"  deep ensemble M         vs leverage:    {rho['deep_vs_leverage']:+.3f}")
    print(f"  deep ensemble M         vs Gaussian M:  {rho['deep_vs_gaussian']:+.3f}")
    print(f"\n{overlap:.0%} of the {top} most memorized digits (deep M) are among the {top} of "
          "highest leverage")
    print("\n index label  leverage  Gaussian M  deep M (nats)   <- the 5 most memorized (deep)")
    for i in np.argsort(-M_deep)[:5]:
        print(f" {i:5d} {int(data.y[i]):5d}  {h[i]:8.3f}  {M_gauss[i]:10.2f}  {M_deep[i]:6.2f}")
    if args.figure:
        plot_memorization_vs_leverage(M_deep, h, args.figure)
        print(f"\nwrote {args.figure}")
    return {"leverage": h, "M_gaussian": M_gauss, "M_deep": M_deep, "rho": rho,
            "overlap": overlap, "leverage_gaussian": np.asarray(gauss.leverage),
            "varying": varying}


if __name__ == "__main__":
    main()
