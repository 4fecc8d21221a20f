"""jaxmem.linear against statsmodels' OLSInfluence and against brute-force refits in numpy.

References are independent of the code under test: statsmodels (pinv-based hat matrix,
LOO refit loop for the external quantities) and n explicit least-squares refits without
example i (numpy lstsq), on real tables that statsmodels ships.
"""

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import statsmodels.api as sm
from statsmodels.stats.outliers_influence import OLSInfluence

import jaxmem.linear as jl
from jaxmem.mesh import make_mesh

F64 = jnp.float64

# Scaled condition numbers (after column equilibration): stackloss 50, ccard 23, cpunish 55,
# scotland 365, longley 4.3e4.


def load(name):
    d = getattr(sm.datasets, name).load_pandas()
    X = sm.add_constant(np.asarray(d.exog, dtype=np.float64), has_constant="add")
    return X, np.asarray(d.endog, dtype=np.float64)


def close(actual, desired, rtol):
    """Relative agreement; entries near zero are judged relative to the array's scale,
    because a difference of rounding-level size cannot be relatively small there."""
    desired = np.asarray(desired, dtype=np.float64)
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), desired, rtol=rtol, atol=rtol * 1e-2 * np.max(np.abs(desired))
    )


# Cholesky on the well-conditioned tables; QR (the robust path) on the worst (longley) too.
# Each new shape costs a few small compilations, so the matrix is kept to five cases.
@pytest.mark.parametrize(
    "name, method",
    [("stackloss", "cholesky"), ("ccard", "cholesky"), ("scotland", "cholesky"), ("longley", "qr"), ("cpunish", "qr")],
)
def test_matches_statsmodels_ols_influence(name, method):
    X, y = load(name)
    ref = OLSInfluence(sm.OLS(y, X).fit())
    got = jl.influence(X, y, method=method, dtype=F64)
    # 1e-8 relative in float64. Cholesky's error is ~eps*kappa^2: 4e-7 for longley
    # (kappa 4.3e4), so longley is held to 1e-5 there; QR (error ~eps*kappa) meets 1e-8.
    rtol = 1e-5 if (name == "longley" and method == "cholesky") else 1e-8
    assert got.rank == X.shape[1]
    assert got.dfbetas.dtype == jnp.float64
    close(got.leverage, ref.hat_matrix_diag, rtol)
    close(got.beta, ref.results.params, rtol)
    close(got.sigma2, ref.results.mse_resid, rtol)
    close(got.studentized_internal, ref.resid_studentized_internal, rtol)
    close(got.studentized_external, ref.resid_studentized_external, rtol)
    close(got.cooks_distance, ref.cooks_distance[0], rtol)
    close(got.dffits, ref.dffits[0], rtol)
    close(got.dfbetas, ref.dfbetas, rtol)
    close(got.loo_residuals, ref.resid_press, rtol)
    assert not np.any(np.asarray(got.undefined))


def brute_force(X, y):
    """n least-squares refits without example i: LOO residual, s_(i)^2, x_i's leverage
    relative to the reduced data, and both predictive log-densities of y_i."""
    n = X.shape[0]
    out = {k: np.empty(n) for k in ("loo_e", "s2_loo", "h_new", "ml", "unb", "post")}
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    r = np.linalg.matrix_rank(X)
    e = y - X @ beta
    sse = e @ e
    h = np.einsum("ij,ji->i", X, np.linalg.pinv(X))
    for i in range(n):
        Xi, yi = np.delete(X, i, 0), np.delete(y, i)
        b, *_ = np.linalg.lstsq(Xi, yi, rcond=None)
        ri = yi - Xi @ b
        res = y[i] - X[i] @ b
        hn = np.sum((np.linalg.pinv(Xi).T @ X[i]) ** 2)  # x^T (Xi^T Xi)^+ x, SVD-based
        out["loo_e"][i] = res
        out["s2_loo"][i] = ri @ ri / (n - 1 - r)
        out["h_new"][i] = hn
        out["ml"][i] = scipy.stats.norm.logpdf(res, scale=math.sqrt(ri @ ri / (n - 1)))
        out["unb"][i] = scipy.stats.norm.logpdf(res, scale=math.sqrt(ri @ ri / (n - 1 - r)))
        out["post"][i] = scipy.stats.t.logpdf(
            res, df=n - 1 - r, scale=math.sqrt(ri @ ri / (n - 1 - r) * (1 + hn))
        )
    out["in_ml"] = scipy.stats.norm.logpdf(e, scale=math.sqrt(sse / n))
    out["in_unb"] = scipy.stats.norm.logpdf(e, scale=math.sqrt(sse / (n - r)))
    out["in_post"] = scipy.stats.t.logpdf(e, df=n - r, scale=np.sqrt(sse / (n - r) * (1 + h)))
    return out


@pytest.mark.parametrize("name", ["stackloss", "scotland"])
def test_loo_quantities_match_brute_force_refits(name):
    X, y = load(name)
    bf = brute_force(X, y)
    # The closed form's own identity for the LOO predictive variance.
    inf = jl.influence(X, y, dtype=F64)
    h = np.asarray(inf.leverage)
    close(h / (1 - h), bf["h_new"], 1e-8)
    close(inf.loo_residuals, bf["loo_e"], 1e-8)
    close(inf.sigma2_loo, bf["s2_loo"], 1e-8)
    for predictive, variance, key in [
        ("plugin", "ml", "ml"),
        ("plugin", "unbiased", "unb"),
        ("posterior", "ml", "post"),
    ]:
        got = jl.loo_log_density_ratio_regression(X, y, predictive=predictive, variance=variance, dtype=F64)
        in_key = "in_" + key
        close(got.log_p_in, bf[in_key], 1e-8)
        close(got.log_p_out, bf[key], 1e-8)
        close(got.score, bf[in_key] - bf[key], 1e-8)
        close(got.leverage, h, 1e-12)


def gaussian_brute_force(X):
    n = X.shape[0]
    mvn = scipy.stats.multivariate_normal
    lp_in = mvn.logpdf(X, X.mean(0), np.cov(X.T, bias=True))
    lp_out = np.array(
        [mvn.logpdf(X[i], np.delete(X, i, 0).mean(0), np.cov(np.delete(X, i, 0).T, bias=True)) for i in range(n)]
    )
    return lp_in, lp_out


# (cpunish has dummy columns, so some LOO covariances are singular: not a valid test case.)
@pytest.mark.parametrize("name, method", [("stackloss", "cholesky"), ("ccard", "qr")])
def test_gaussian_density_ratio_matches_brute_force_refits(name, method):
    X = load(name)[0][:, 1:]  # drop the constant: the Gaussian is fitted to the raw rows
    lp_in, lp_out = gaussian_brute_force(X)
    got = jl.loo_log_density_ratio_gaussian(X, method=method, dtype=F64)
    close(got.log_p_in, lp_in, 1e-8)
    close(got.log_p_out, lp_out, 1e-8)
    close(got.score, lp_in - lp_out, 1e-8)
    # h_i = 1/n + d_i is the leverage of the design [1, X].
    close(got.leverage, jl.leverage(sm.add_constant(X), method="qr", dtype=F64), 1e-10)


def test_qr_and_cholesky_agree_and_float32_tolerance():
    X, y = load("scotland")  # kappa = 365
    h_qr = np.asarray(jl.leverage(X, method="qr", dtype=F64))
    h_ch = np.asarray(jl.leverage(X, method="cholesky", dtype=F64))
    close(h_ch, h_qr, 1e-10)  # eps * kappa^2 = 3e-11
    np.testing.assert_allclose(h_qr.sum(), X.shape[1], rtol=1e-12)  # trace(H) = rank
    # float32 (the default): relative error ~ eps32 * kappa^2 = 1.6e-2 for Cholesky on scotland;
    # QR's ~ eps32 * kappa = 4e-5. Checked against float64 with a 5x margin.
    for method, rtol in [("cholesky", 5e-2), ("qr", 2e-4)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            h32 = jl.leverage(X, method=method)
        assert h32.dtype == jnp.float32
        close(h32, h_qr, rtol)
    # Well-conditioned stackloss (kappa 50): float32 Cholesky within 1e-3 of float64, with
    # residual errors absolute at the scale of the largest residual (eps32 * kappa * |y|).
    Xs, ys = load("stackloss")
    t64 = np.asarray(jl.influence(Xs, ys, dtype=F64).studentized_external)
    t32 = np.asarray(jl.influence(Xs, ys).studentized_external)
    np.testing.assert_allclose(t32, t64, rtol=1e-3, atol=1e-3 * np.abs(t64).max())


def test_warnings_point_at_the_callers_line():
    """Every public entry reaching a warning at its own depth: a fixed stacklevel pointed the
    rank warning of influence() and leverage() into linear.py, where the once-per-location
    filter also merged the warnings of different call sites."""
    X, y = load("stackloss")
    dup = np.c_[X, 2 * X[:, 1] - X[:, 2]]
    calls = {
        "leverage": lambda: jl.leverage(dup, dtype=F64),
        "influence": lambda: jl.influence(dup, y, dtype=F64),
        "ratio": lambda: jl.loo_log_density_ratio_regression(dup, y, dtype=F64),
    }
    for name, call in calls.items():
        with pytest.warns(RuntimeWarning, match="numerical rank 4 of 5") as record:
            call()
        where = {(w.filename, w.lineno) for w in record if "numerical rank" in str(w.message)}
        assert {f for f, _ in where} == {__file__}, (name, where)
    # the advice names only the options the call did not use
    for method, advice in (("cholesky", "If X is full rank, use method='qr'"),
                           ("qr", "In float64 by QR this is X's own rank")):
        with pytest.warns(RuntimeWarning, match="numerical rank 4 of 5") as record:
            jl.leverage(dup, dtype=F64, method=method)
        text = " ".join(str(w.message) for w in record)
        assert advice in text and "dtype=jnp.float64" not in text, text


def test_ill_conditioned_float32_cholesky_warns():
    X, _ = load("scotland")
    with pytest.warns(RuntimeWarning, match="ill-conditioned"):
        jl.leverage(X)


def test_float32_leave_one_out_cancellation_warns():
    # n = p + 2: two residual degrees of freedom, so SSE_(i) = SSE - e_i^2/(1 - h_i) is a
    # small difference for some rows, and float32's M of those rows is off by far more
    # than float32 rounding (measured: 531 nats, 0.55% of M ~ 1e5, on row 17; the warning
    # estimates up to 2e-1, an upper-side estimate). The warning must name them; float64
    # and ordinary float32 problems (stackloss: n - p = 17) must stay silent.
    rng = np.random.default_rng(3)
    p = 20
    X = rng.normal(size=(p + 2, p))
    y = X @ rng.normal(size=p) + rng.normal(size=p + 2)
    with pytest.warns(RuntimeWarning, match="may carry relative errors") as record:
        m32 = np.asarray(jl.loo_log_density_ratio_regression(X, y).score, np.float64)
    message = next(str(w.message) for w in record if "may carry" in str(w.message))
    named = {int(i) for i in message.split("row(s) (")[1].split(")")[0].replace(", ...", "").split(", ")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        m64 = np.asarray(jl.loo_log_density_ratio_regression(X, y, dtype=F64).score)
        Xs, ys = load("stackloss")
        jl.loo_log_density_ratio_regression(Xs, ys)
        jl.influence(Xs, ys, method="qr")
    rel = np.abs(m32 - m64) / (1 + np.abs(m64))
    assert rel.max() > 1e-3 and int(np.argmax(rel)) in named, (rel.max(), np.argmax(rel), named)
    with pytest.warns(RuntimeWarning, match="may carry relative errors"):
        jl.influence(X, y)  # sigma2_loo, studentized_external, ... rest on the same SSE_(i)


@pytest.mark.usefixtures("devices8")
def test_sharded_equals_unsharded():
    X, y = load("ccard")  # n = 72: not a multiple of 8 devices after slicing below
    X, y = X[:69], y[:69]
    one = jl.influence(X, y, dtype=F64, mesh=make_mesh(1))
    eight = jl.influence(X, y, dtype=F64, mesh=make_mesh(8))  # 69 rows -> padded to 72
    # Only the summation order of the psum differs: agreement to rounding.
    for field in ("leverage", "beta", "studentized_external", "dfbetas", "cooks_distance"):
        close(getattr(eight, field), getattr(one, field), 1e-11)
    # And both equal the in-memory QR path (independent factorization), as in float64.
    close(eight.leverage, jl.leverage(X, method="qr", dtype=F64), 1e-11)
    # The per-column prescale (extreme scales) is applied before the psum too.
    D = np.geomspace(1e-170, 1e170, X.shape[1])
    tiny = jl.influence(X * D, y, dtype=F64, mesh=make_mesh(8))
    close(tiny.leverage, one.leverage, 1e-10)
    close(np.asarray(tiny.beta) * D, one.beta, 1e-10)
    assert eight.dfbetas.shape == X.shape


def test_streamed_equals_in_memory(tmp_path):
    X, _ = load("modechoice") if hasattr(sm.datasets, "modechoice") else load("ccard")
    ref = np.asarray(jl.leverage(X, method="qr", dtype=F64))
    mm = np.lib.format.open_memmap(tmp_path / "X.npy", mode="w+", dtype=np.float64, shape=X.shape)
    mm[:] = X
    mm.flush()
    ro = np.load(tmp_path / "X.npy", mmap_mode="r")
    h = jl.leverage_streamed(ro, block_rows=97, dtype=F64)  # ragged last block
    close(h, ref, 1e-10)
    # A callable returning blocks of uneven size, written into a caller's buffer.
    edges = [0, 5, 300, 301, X.shape[0]]
    out = np.zeros(X.shape[0])
    jl.leverage_streamed(lambda b: X[edges[b] : edges[b + 1]], num_blocks=4, dtype=F64, out=out)
    close(out, ref, 1e-10)
    bad = X.copy()
    bad[333, 2] = np.nan
    with pytest.raises(ValueError, match=r"X\[333, 2\] is nan"):
        jl.leverage_streamed(bad, block_rows=100)


@pytest.mark.filterwarnings("ignore::statsmodels.tools.sm_exceptions.SingularMatrixWarning")
def test_rank_deficient_is_pseudo_inverse():
    X, y = load("stackloss")
    dup = np.c_[X, 2 * X[:, 1] - X[:, 2]]  # exactly collinear extra column
    near = np.c_[X, X[:, 1] * (1 + 1e-11 * np.cos(np.arange(len(X))))]  # singular at rcond
    ref = jl.influence(X, y, dtype=F64, method="qr")
    sm_ref = OLSInfluence(sm.OLS(y, dup).fit())  # statsmodels also uses the pseudo-inverse
    for Xd in (dup, near):
        for method in ("cholesky", "qr"):
            # said, not done silently: the pseudo-inverse differs from a full-rank fit's
            with pytest.warns(RuntimeWarning, match=r"numerical rank 4 of 5 columns in float64: 1 direction"):
                got = jl.influence(Xd, y, dtype=F64, method=method)
            assert got.rank == X.shape[1]
            close(got.leverage, ref.leverage, 1e-8)
            close(got.residuals, ref.residuals, 1e-8)
            close(got.studentized_external, ref.studentized_external, 1e-8)
            close(got.dffits, ref.dffits, 1e-8)
            assert np.all(np.isfinite(np.asarray(got.dfbetas)))
    close(jl.influence(dup, y, dtype=F64).studentized_external, sm_ref.resid_studentized_external, 1e-8)
    # Zero column: rank drops, nothing blows up, and no warning (e.g. always-0 pixels).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jl.influence(np.c_[X, np.zeros(len(X))], y, dtype=F64).rank == X.shape[1]
    # Full rank but beyond float32's resolution (condition 2e4 after equilibration: the
    # Gram path's eigenvalues err by ~eps kappa^2 >> 1): cut, and said.
    rng = np.random.default_rng(1)
    Xi = np.column_stack([np.ones(50), 1e4 + rng.normal(size=50), rng.normal(size=50)])
    with pytest.warns(RuntimeWarning, match="numerical rank 2 of 3 columns in float32"):
        jl.leverage(Xi)


def test_leverage_one_rows_are_flagged_not_huge():
    X, y = load("ccard")
    spike = np.zeros(len(X))
    spike[7] = 1.0  # a dummy that only example 7 has: h_7 = 1, its residual is exactly 0
    Xd = np.c_[X, spike]
    inf = jl.influence(Xd, y, dtype=F64)
    und = np.asarray(inf.undefined)
    assert und.tolist() == [i == 7 for i in range(len(X))]
    np.testing.assert_allclose(np.asarray(inf.leverage)[7], 1.0, atol=1e-12)
    for field in ("loo_residuals", "studentized_external", "studentized_internal", "cooks_distance", "dffits"):
        v = np.asarray(getattr(inf, field))
        assert np.isnan(v[7]) and np.all(np.isfinite(np.delete(v, 7))), field
    assert np.all(np.isnan(np.asarray(inf.dfbetas)[7]))
    assert np.isnan(float(inf.press))
    rat = jl.loo_log_density_ratio_regression(Xd, y, dtype=F64)
    assert np.isnan(np.asarray(rat.score)[7]) and np.asarray(rat.undefined)[7]
    # The other rows still equal brute-force refits (removing them keeps the dummy's fit).
    bf = brute_force(Xd, y)
    keep = np.arange(len(X)) != 7
    close(np.asarray(rat.score)[keep], (bf["in_ml"] - bf["ml"])[keep], 1e-8)
    close(np.asarray(inf.sigma2_loo)[keep], bf["s2_loo"][keep], 1e-8)


def test_exactly_fitted_y_is_refused():
    # y constant, or an exact linear function of X's columns: the residuals are rounding
    # noise and every s^2-scaled statistic 0/0 (t_i = 1 and equal Cook's distances before).
    X, y = load("stackloss")
    beta = np.array([3.0, 0.5, -1.0, 2.0])
    for target in (np.full(len(X), 7.0), X @ beta, np.zeros(len(X))):
        for method, dtype in (("cholesky", F64), ("qr", F64), ("cholesky", None), ("qr", None)):
            with pytest.raises(ValueError, match=r"y is fitted exactly.*residual variance 0 up to rounding"):
                jl.influence(X, target, method=method, dtype=dtype)
            with pytest.raises(ValueError, match="y is fitted exactly"):
                jl.loo_log_density_ratio_regression(X, target, method=method, dtype=dtype)
    with pytest.raises(ValueError, match="y is fitted exactly"):
        jl.influence(X, X @ beta, dtype=F64, mesh=make_mesh(8))
    # a constant target with constant columns too (rank 1), as in a CSV of constant columns
    with pytest.raises(ValueError, match="y is fitted exactly"):
        jl.influence(np.c_[np.ones(len(X)), np.full(len(X), 3.0)], np.ones(len(X)), dtype=F64)
    # leverage needs no y and still works; a tiny but genuine residual is kept (relative
    # size 1e-8 of y, far above float64 rounding) and matches statsmodels
    np.testing.assert_allclose(np.asarray(jl.leverage(X, dtype=F64)), OLSInfluence(sm.OLS(y, X).fit()).hat_matrix_diag,
                               rtol=1e-10)
    noise = np.random.default_rng(0).normal(size=len(X)) * 1e-6
    ref = OLSInfluence(sm.OLS(X @ beta + noise, X).fit())
    close(jl.influence(X, X @ beta + noise, dtype=F64).studentized_external, ref.resid_studentized_external, 1e-3)


def test_bad_inputs_raise_clear_errors():
    X, y = load("stackloss")
    bad = X.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"X\[4, 2\] is nan"):
        jl.leverage(bad)
    with pytest.raises(ValueError, match=r"X\[4, 2\] is nan"):
        jl.leverage(bad, method="qr")
    bad[4, 2] = np.inf
    with pytest.raises(ValueError, match=r"X\[4, 2\] is inf"):
        jl.influence(bad, y)
    with pytest.raises(ValueError, match="X is complex"):
        jl.leverage(X.astype(np.complex64))
    with pytest.raises(ValueError, match="y is complex"):
        jl.influence(X, y.astype(np.complex128))
    # a finite float64 entry beyond float32's range: named as such, not as "inf"
    bad[4, 2] = 1e39
    with pytest.warns(RuntimeWarning, match="overflow"), \
            pytest.raises(ValueError, match=r"X\[4, 2\] = 1e\+39 does not fit in float32.*dtype=jnp.float64"):
        jl.leverage_streamed(bad, block_rows=8)
    with pytest.warns(RuntimeWarning, match="overflow"), \
            pytest.raises(ValueError, match=r"X\[4, 2\] is inf: .*beyond float32's range.*dtype=jnp.float64"):
        jl.leverage(bad)
    yb = y.copy()
    yb[9] = np.nan
    with pytest.raises(ValueError, match=r"y\[9\] is nan"):
        jl.influence(X, yb)
    # n = p: leverage needs no residual degrees of freedom (full row rank: every h_i = 1)
    np.testing.assert_allclose(np.asarray(jl.leverage(X[:4], dtype=F64, method="qr")), 1.0, rtol=1e-10)
    with pytest.raises(ValueError, match=r"n=0 rows.*n >= 1"):
        jl.leverage(X[:0])
    with pytest.raises(ValueError, match=r"n=2 rows .*n >= 3 \(n >= rank \+ 2"):
        jl.influence(X[:2], y[:2])
    with pytest.raises(ValueError, match=r"n=4 rows .*n >= 5 .*leave-one-out covariance would be singular"):
        jl.loo_log_density_ratio_gaussian(X[:4, 1:])  # k = 3
    with pytest.raises(ValueError, match=r"n=5 rows and rank 4; this needs n >= rank \+ 2 = 6"):
        jl.influence(X[:5], y[:5])  # n = p + 1: no LOO variance
    with pytest.raises(ValueError, match="2-D"):
        jl.leverage(y)
    with pytest.raises(ValueError, match=r"y must have shape \(21,\)"):
        jl.influence(X, y[:-1])
    with pytest.raises(ValueError, match="method"):
        jl.leverage(X, method="svd")
    with pytest.raises(ValueError, match="no sharded path"):
        jl.leverage(X, method="qr", mesh=make_mesh(1))
    with pytest.raises(ValueError, match="dtype"):
        jl.leverage(X, dtype=np.float16)
    with pytest.raises(ValueError, match="predictive"):
        jl.loo_log_density_ratio_regression(X, y, predictive="bayes")
    with pytest.raises(ValueError, match="singular"):
        jl.loo_log_density_ratio_gaussian(np.c_[X[:, 1:], X[:, 1] + X[:, 2]], dtype=F64)
    with pytest.raises(ValueError, match="num_blocks"):
        jl.leverage_streamed(lambda b: X)


def test_float32_extreme_column_scales():
    """Entries whose squares overflow (or underflow) float32: the Gram paths prescale each
    column by a power of two near its max |entry|, so h is that of the unscaled X (leverage is
    invariant to column scaling) instead of an error, a wrong h or a silently dropped column."""
    X, y = load("stackloss")  # kappa 50: float32 Cholesky error ~ eps32 * kappa^2 = 3e-4
    ref = np.asarray(jl.leverage(X, method="qr", dtype=F64))
    big = X.copy()
    big[4, 2] = 1e20  # finite in float32, its square is not (this used to raise "overflows")
    ref_big = jl.leverage(big, method="qr", dtype=F64)
    for h in (jl.leverage(big), jl.leverage_streamed(big, block_rows=8), jl.leverage(big, method="qr")):
        close(h, ref_big, 1e-4)
    col = X.copy()
    col[:, 2] *= 1e-25  # squares underflow float32 (the column used to be dropped: sum h = 3)
    cases = {"X*1e-19": X * 1e-19, "X*1e-20": X * 1e-20, "X*1e+19": X * 1e19, "col*1e-25": col}
    for name, Xs in cases.items():
        for h in (jl.leverage(Xs), jl.leverage_streamed(Xs, block_rows=8), jl.leverage(Xs, method="qr")):
            close(h, ref, 1e-3)
            np.testing.assert_allclose(float(np.sum(h)), 4.0, rtol=1e-4, err_msg=name)
    # float64 has the same limits further out (squares of 1e-170 are subnormal).
    close(jl.leverage(X * 1e-170, dtype=F64), ref, 1e-10)
    close(jl.leverage_streamed(X * 1e170, block_rows=5, dtype=F64), ref, 1e-10)
    # Scale-dependent outputs stay in original units: beta_j scales as 1 / column scale.
    D = np.array([1e-19, 1.0, 1e19, 1.0])
    inf64 = jl.influence(X, y, dtype=F64)
    inf32 = jl.influence(X * D, y)
    close(np.asarray(inf32.beta) * D, inf64.beta, 1e-3)
    close(inf32.leverage, inf64.leverage, 1e-3)
    # log det of the Gaussian's covariance too: log p shifts by -k log(scale), M_i does not.
    Xg = X[:, 1:]
    g64 = jl.loo_log_density_ratio_gaussian(Xg, dtype=F64)
    g_small = jl.loo_log_density_ratio_gaussian(Xg * 1e-19)
    close(np.asarray(g_small.log_p_in) - 3 * math.log(1e19), g64.log_p_in, 1e-4)
    close(g_small.score, g64.score, 1e-3)
    # A genuinely rank-deficient X is still one at any scale; an all-zero X still has rank 0.
    dup = np.c_[X, 2 * X[:, 1] - X[:, 2]]
    for s in (1.0, 1e-20):
        close(jl.leverage(dup * s), ref, 1e-3)
    with pytest.raises(ValueError, match="rank 0"):
        jl.leverage(np.zeros_like(X))


def test_rcond_and_out_are_validated():
    X, y = load("stackloss")
    for rcond in (float("nan"), 2, 1.0, -1, float("inf"), "0.1", True):
        with pytest.raises(ValueError, match=r"rcond must be None .* in \[0, 1\)"):
            jl.leverage(X, rcond=rcond)
    with pytest.raises(ValueError, match="rcond"):
        jl.leverage_streamed(X, rcond=-1e-3)
    with pytest.raises(ValueError, match="rcond"):
        jl.influence(X, y, rcond=float("nan"))
    with pytest.raises(ValueError, match="rcond"):
        jl.loo_log_density_ratio_regression(X, y, rcond=1.5)
    assert jl.leverage(X, rcond=0.0, dtype=F64).shape == (21,)  # 0 is allowed: keep all nonzero

    def never(b):  # out is checked before the first pass reads any block
        raise AssertionError("block read before `out` was validated")

    n = X.shape[0]
    with pytest.raises(ValueError, match="out must have a floating-point dtype.*int64"):
        jl.leverage_streamed(X, out=np.zeros(n, np.int64))  # it used to return all zeros
    with pytest.raises(ValueError, match="floating-point dtype"):
        jl.leverage_streamed(never, num_blocks=2, out=np.zeros(n, bool))
    with pytest.raises(ValueError, match=r"out must have shape \(21,\), got \(20,\)"):
        jl.leverage_streamed(X, out=np.zeros(n - 1))
    with pytest.raises(ValueError, match=r"out must have shape \(21,\)"):
        jl.leverage_streamed(lambda b: X, num_blocks=1, out=np.zeros(n + 1))  # n known after pass 1
    with pytest.raises(ValueError, match=r"out must have shape \[n\]"):
        jl.leverage_streamed(never, num_blocks=1, out=np.zeros((n, 1)))
    with pytest.raises(ValueError, match="numpy array"):
        jl.leverage_streamed(X, out=[0.0] * n)
    ro = np.zeros(n)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        jl.leverage_streamed(X, out=ro)
    out32 = np.zeros(n, np.float32)
    assert jl.leverage_streamed(X, out=out32, dtype=F64) is out32
    close(out32, jl.leverage(X, method="qr", dtype=F64), 1e-6)


def test_gaussian_density_ratio_is_translation_invariant_in_float32():
    """float64 data around 1e6 scored in float32: centred in float64 first, so the score is
    that of the centred data (measured error 9e-7 nats; without it 0.21 nats at 1e6).
    Tolerance 1e-4 nats: float32 rounding of O(1) scores."""
    Z = np.random.default_rng(2).normal(size=(30, 2))
    ref = np.asarray(jl.loo_log_density_ratio_gaussian(Z, dtype=F64).score)
    for offset in (1e4, 1e6):
        got = np.asarray(jl.loo_log_density_ratio_gaussian(Z + offset).score)
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_ill_conditioned_cholesky_float64_warns_per_row_and_names_qr():
    # A Unix-timestamp column beside an intercept: kappa ~ 2e7 after equilibration, so the
    # float64 Cholesky path's residuals err by tens of percent. The warnings must say so and
    # advise method='qr' (not float64: it is float64 already); QR is exact and silent.
    rng = np.random.default_rng(0)
    n = 300
    ts = np.round(1.7e9 + rng.uniform(0, 600, n))
    temp = rng.normal(20, 2, n)
    y = 0.01 * (ts - ts.min()) + 0.5 * temp + rng.normal(size=n)
    X = np.c_[np.ones(n), ts, temp]
    with pytest.warns(RuntimeWarning) as record:
        jl.influence(X, y, dtype=F64)
    messages = [str(w.message) for w in record]
    ill = next(m for m in messages if "ill-conditioned (condition number" in m)
    assert "use method='qr'" in ill and "float64" not in ill.split("use ")[-1], ill
    per_row = next(m for m in messages if "may carry relative errors" in m)
    assert "Cholesky path" in per_row and "use method='qr'" in per_row, per_row
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        q = jl.influence(X, y, dtype=F64, method="qr")
    ref = OLSInfluence(sm.OLS(y, np.c_[np.ones(n), ts - ts.mean(), temp]).fit())  # centred: kappa ~ 1e2
    # QR's residuals err by ~eps * kappa * ||y|| / ||e|| = 8e-8 of their scale (t and D are
    # of order 1 and 0.1); an absolute 1e-6 leaves headroom (Cholesky: off by 0.4 and 0.009).
    np.testing.assert_allclose(np.asarray(q.cooks_distance), ref.cooks_distance[0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(q.studentized_external), ref.resid_studentized_external, atol=1e-6)


def test_float32_y_far_outside_its_range_is_named_not_called_an_exact_fit():
    """y in joules (~1e-19) or at 1e20 in float32: the sums of squares under/overflow, and
    the refusal said 'y is fitted exactly by X' (0 <= 0, inf <= inf). Now the magnitude is
    named, with what to do; float64 takes it (the statistics do not depend on y's scale)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    X = np.c_[np.ones(50), x]
    y = 2.0 + 0.5 * x + 0.3 * rng.normal(size=50)
    ref = jl.influence(X, y, dtype=np.float64)
    for scale, what in ((1.602176634e-19, "underflow"), (1e20, "overflow")):
        with pytest.raises(ValueError, match=rf"y's largest magnitude is .*of its residuals {what} .*jnp.float64"):
            jl.influence(X, y * scale)
        got = jl.influence(X, y * scale, dtype=np.float64)
        # scale-free statistics, float64 rounding only
        np.testing.assert_allclose(np.asarray(got.studentized_external), np.asarray(ref.studentized_external),
                                   rtol=1e-10)


def lstsq_brute_force(X, y):
    """float64 leave-one-out refits with numpy's lstsq (the pseudo-inverse fit), any rank."""
    n = len(y)
    r = np.linalg.matrix_rank(X)
    e = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
    out = {k: np.zeros(n) for k in ("loo_e", "s2_loo", "ml", "unbiased")}
    for i in range(n):
        Xi, yi = np.delete(X, i, 0), np.delete(y, i)
        assert np.linalg.matrix_rank(Xi) == r  # no row is needed for the rank here
        b = np.linalg.lstsq(Xi, yi, rcond=None)[0]
        sse_i = np.sum((yi - Xi @ b) ** 2)
        out["loo_e"][i] = y[i] - X[i] @ b
        out["s2_loo"][i] = sse_i / (n - 1 - r)
        for key, (d_in, d_out) in (("ml", (n, n - 1)), ("unbiased", (n - r, n - 1 - r))):
            out[key][i] = (scipy.stats.norm.logpdf(e[i], scale=np.sqrt(e @ e / d_in))
                           - scipy.stats.norm.logpdf(out["loo_e"][i], scale=np.sqrt(sse_i / d_out)))
    out["h"] = np.diag(X @ np.linalg.pinv(X))
    out["e"], out["rank"] = e, r
    return out


def test_rank_deficient_small_n_is_computed_against_the_rank():
    """n >= rank + 2 is what the regression needs, not n >= p + 2: a rank-4 X with 7 rows and
    6 columns (two redundant) was refused as 'n <= p'; a 5 x 7 X of rank 3 (more columns than
    rows, one all zero) is computable too. Both equal float64 lstsq refits."""
    rng = np.random.default_rng(0)
    A = np.c_[np.ones(7), rng.normal(size=(7, 3))]
    tall = np.c_[A, A[:, 1] + A[:, 2], 2 * A[:, 3]]  # 7 x 6, rank 4
    B = np.c_[np.ones(5), rng.normal(size=(5, 2))]
    wide = np.c_[B, B[:, 1] - B[:, 2], np.zeros(5), 3 * B[:, 1], B @ [1.0, 2.0, 3.0]]  # 5 x 7, rank 3
    for X in (tall, wide):
        y = rng.normal(size=len(X))
        ref = lstsq_brute_force(X, y)
        for method in ("cholesky", "qr"):
            with pytest.warns(RuntimeWarning, match="numerical rank"):
                h = jl.leverage(X, method=method, dtype=F64)
            close(h, ref["h"], 1e-10)
            with pytest.warns(RuntimeWarning, match="numerical rank"):
                inf = jl.influence(X, y, method=method, dtype=F64)
            assert inf.rank == ref["rank"]
            close(inf.residuals, ref["e"], 1e-8)
            close(inf.loo_residuals, ref["loo_e"], 1e-8)
            close(inf.sigma2_loo, ref["s2_loo"], 1e-8)
            for variance in ("ml", "unbiased"):
                with pytest.warns(RuntimeWarning, match="numerical rank"):
                    got = jl.loo_log_density_ratio_regression(X, y, variance=variance, method=method, dtype=F64)
                close(got.score, ref[variance], 1e-8)
    # more columns than rows: the rank warning says why the cut is forced, not 'if X is full rank'
    with pytest.warns(RuntimeWarning, match=r"only n=5 rows for its 6 non-zero columns"):
        jl.leverage(wide, dtype=F64)
    # one row short of rank + 2: refused naming the rank, not p
    with pytest.warns(RuntimeWarning, match="numerical rank"), \
            pytest.raises(ValueError, match=r"n=5 rows and rank 4 \(of p=6 columns\); this needs n >= rank \+ 2 = 6"):
        jl.influence(tall[:5], rng.normal(size=5), dtype=F64)


def _small_gaussian(seed):
    # the exploratory pass's problems: n = k + 2 with one row scaled up, so h_i near 1
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(5, 3))
    X[0] *= 10 ** rng.uniform(0, 2)
    return X


def test_gaussian_float32_names_rows_whose_score_may_be_off():
    """M_i grows like 1/(1 - h_i), which multiplies the leverage's float32 error: seed 11 was
    off by 9% (h = 0.998) under a warning that stated h's error (1e-3), seeds 22 and 26 by
    0.35% and 1.9% silently. The rows off by more than 3e-3 must be named; float64 and a
    well-conditioned float32 problem stay silent."""
    for seed in (11, 22, 26):
        X = _small_gaussian(seed)
        ref = np.asarray(jl.loo_log_density_ratio_gaussian(X, method="qr", dtype=F64).score)
        with pytest.warns(RuntimeWarning, match=r"the scores M of .* row\(s\)") as record:
            got = jl.loo_log_density_ratio_gaussian(X.astype(np.float32))
        message = next(str(w.message) for w in record if "the scores M of" in str(w.message))
        assert "dtype=jnp.float64" in message, message
        named = {int(i) for i in message.split("row(s) (")[1].split(")")[0].replace(", ...", "").split(", ")}
        m = np.asarray(got.score, np.float64)
        ok = ~np.asarray(got.undefined)
        rel = np.where(ok, np.abs(m - ref) / (1 + np.abs(ref)), 0)
        off = set(np.flatnonzero(rel > 3e-3).tolist())
        assert off and off <= named, (seed, rel, named)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            jl.loo_log_density_ratio_gaussian(X, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        Z = np.random.default_rng(5).normal(size=(40, 3))
        jl.loo_log_density_ratio_gaussian(Z.astype(np.float32))
        jl.loo_log_density_ratio_gaussian(load("stackloss")[0][:, 1:])


def test_gaussian_float32_input_with_an_offset_is_centred_in_float64():
    """A float32 array with a large mean against its spread (offset 1e4 x the spread) was
    centred in float32; now it is centred on the host in float64 like a float64 array."""
    Z = np.random.default_rng(2).normal(size=(30, 2))
    X32 = (Z + 1e4).astype(np.float32)
    ref = np.asarray(jl.loo_log_density_ratio_gaussian(X32.astype(np.float64), dtype=F64).score)
    np.testing.assert_allclose(np.asarray(jl.loo_log_density_ratio_gaussian(X32).score), ref, atol=1e-4)
