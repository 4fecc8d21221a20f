"""Scores against an independent float64 numpy reference of DESIGN.md §1.1."""
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from jaxmem.membership import balanced_subsets, kfold
from jaxmem.mesh import make_mesh
from jaxmem.scores import feldman_zhang, memorization_scores, quantile_flags


# ------------------------------------------------------------- the reference
def _lme(x):
    return logsumexp(x) - np.log(len(x))


def reference_jackknife(ll, keep):
    """Loop-per-example float64 U, V and delete-one jackknife variances of each side."""
    ll = np.asarray(ll, dtype=np.float64)
    n = ll.shape[1]
    U, V, var_u, var_v = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    for i in range(n):
        for side, var, mask in ((U, var_u, keep[:, i]), (V, var_v, ~keep[:, i])):
            x = ll[mask, i]
            side[i] = _lme(x)
            if len(x) < 2:
                var[i] = np.nan
                continue
            theta = np.array([_lme(np.delete(x, j)) for j in range(len(x))])
            var[i] = (len(x) - 1) / len(x) * np.sum((theta - theta.mean()) ** 2)
    return U, V, var_u, var_v


def reference_scores(ll, keep):
    """U, V, M and the stratified jackknife stderr sqrt(var_U + var_V)."""
    U, V, var_u, var_v = reference_jackknife(ll, keep)
    return U, V, U - V, np.sqrt(var_u + var_v)


def _check_against_reference(s, ll, keep, *, u_rtol, m_atol):
    U, V, M, se = reference_scores(ll, keep)
    np.testing.assert_allclose(np.asarray(s.U), U, rtol=u_rtol, atol=m_atol)
    np.testing.assert_allclose(np.asarray(s.V), V, rtol=u_rtol, atol=m_atol)
    np.testing.assert_allclose(np.asarray(s.M), M, rtol=1e-5, atol=m_atol)
    np.testing.assert_array_equal(np.asarray(s.n_in), keep.sum(0))
    np.testing.assert_array_equal(np.asarray(s.n_out), (~keep).sum(0))
    np.testing.assert_allclose(np.asarray(s.stderr), se, rtol=1e-4, atol=1e-5, equal_nan=True)


MESH1 = None  # built lazily: conftest must set the device count first


def mesh1():
    global MESH1
    if MESH1 is None:
        MESH1 = make_mesh(1)
    return MESH1


# --------------------------------------------------------------- correctness
# Most tests share the [12 models, 37 examples] shape of kfold(37, 4, 3) so that the
# jitted programs compile once per process (compilation dominates this file's time).
def test_random_inputs_match_reference():
    plan = kfold(37, 4, 3, seed=0)  # 37: not a multiple of 8, exercises padding
    rng = np.random.default_rng(0)
    ll = rng.normal(-40, 5, plan.keep.shape).astype(np.float32)
    s = memorization_scores(ll, plan, mesh=mesh1())
    # float32 kernel vs float64 reference on the same float32 inputs: values are O(50),
    # float32 relative rounding ~6e-8 per op over ~12 terms -> 1e-5 absolute.
    _check_against_reference(s, ll, plan.keep, u_rtol=1e-6, m_atol=1e-5)
    # the quantile flags use the quantile of M, not "M > 0.95"
    thr = np.quantile(np.asarray(s.M), 0.95)
    np.testing.assert_allclose(float(s.threshold), thr, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(s.highly_memorized), np.asarray(s.M) > float(s.threshold))
    assert int(np.asarray(s.highly_memorized).sum()) == 2  # 5% of 37 examples, rounded up


def test_adversarial_magnitudes_and_single_models():
    rng = np.random.default_rng(1)
    models, n = 6, 10
    keep = np.zeros((models, n), dtype=bool)
    keep[:3] = True  # default: 3 in, 3 out
    keep[:, 4] = [True, False, False, False, False, False]  # a single in-model
    keep[:, 5] = [True, True, True, True, True, False]  # a single out-model
    ll = rng.normal(0, 1, (models, n))
    ll[:, 0] += -1e5  # all around -1e5
    ll[:, 1] += -3.0  # ordinary
    ll[:3, 2] = -3.0 + ll[:3, 2]  # in-models at -3, out-models at -1e5: M ~ 1e5
    ll[3:, 2] = -1e5 + ll[3:, 2]
    ll[:, 3] = [-3.0, -1e5, -2e3, -1e5, -4.0, -7e4]  # mixed within each side
    ll[:, 6] = [0.0, -200.0, -200.5, -1.0, -300.0, -150.0]  # one model dominates a side:
    # deleting it in the jackknife needs log-space leave-one-out sums (exp(-200) underflows)
    ll[:, 7] += -1e5
    ll[:, 8] = -42.0  # every model ties: M = 0 and a zero stderr, exactly
    ll[:, 9] = [-1.0, -1.0, -5.0, -2.0, -2.0, -7.0]  # tied maxima: the jackknife's
    # leave-the-max-out branch must use the other, equal, maximum
    ll = ll.astype(np.float32)
    s = memorization_scores(ll, keep, mesh=mesh1())
    # U, V ~ 1e5: a float32 ulp there is 0.0078, so compare U, V relatively (2 ulp);
    # M is assembled from shifted O(1) parts and stays accurate to 1e-5 absolute... except
    # for example 2, whose true M is itself ~1e5 (relative check via rtol=1e-5).
    _check_against_reference(s, ll, keep, u_rtol=2.4e-7, m_atol=1e-5)
    assert np.isnan(np.asarray(s.stderr)[[4, 5]]).all()  # one in / one out: not estimable
    np.testing.assert_array_equal(np.asarray(s.U)[4], ll[0, 4])  # mean of one density
    np.testing.assert_array_equal(np.asarray(s.V)[5], ll[5, 5])
    assert np.isfinite(np.asarray(s.stderr)[[0, 1, 2, 3, 6, 7, 9]]).all()
    assert float(s.M[8]) == 0.0 and float(s.stderr[8]) == 0.0


def test_m_keeps_precision_at_minus_1e5():
    # in-models all 0.25 nats above out-models, everything near -1e5: U and V are each
    # rounded to float32 (spacing 0.0078) but M must come out at 0.25 nearly exactly.
    plan = kfold(37, 4, 3, seed=3)
    rng = np.random.default_rng(3)
    base = np.float32(-1e5) + rng.normal(0, 1, 37).astype(np.float32)
    ll = np.where(plan.keep, base + np.float32(0.25), base).astype(np.float32)
    delta = (base + np.float32(0.25)) - base  # the float32-representable increment
    s = memorization_scores(ll, plan, mesh=mesh1())
    np.testing.assert_allclose(np.asarray(s.M), delta, atol=1e-6)


def test_sharded_equals_unsharded(devices8):
    plan = kfold(37, 4, 3, seed=1)
    rng = np.random.default_rng(2)
    ll = rng.normal(-100, 10, plan.keep.shape).astype(np.float32)
    for unc in ("jackknife", "bootstrap"):
        a = memorization_scores(ll, plan, mesh=mesh1(), uncertainty=unc, num_bootstrap=50)
        b = memorization_scores(ll, plan, mesh=make_mesh(8), uncertainty=unc, num_bootstrap=50)
        for name in a._fields:
            # row-wise kernels, per-example bootstrap keys: only float reassociation differs
            np.testing.assert_allclose(
                np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), rtol=1e-6, atol=1e-6,
                err_msg=f"{unc}: {name}",
            )
    fa = feldman_zhang(ll, plan, mesh=mesh1())
    fb = feldman_zhang(ll, plan, mesh=make_mesh(8))
    for name in fa._fields:
        np.testing.assert_allclose(np.asarray(getattr(fa, name)), np.asarray(getattr(fb, name)), rtol=1e-6)


def test_mesh_none_under_several_processes_uses_this_process_devices(devices8, monkeypatch):
    """Under jax.distributed (simulated: process_count 2, this process holding devices 2-3
    of the 8) mesh=None scores on this process's devices only, so that process 0 alone can
    score the matrix loglik_matrix_multihost returned everywhere (tests/test_multihost.py
    runs that with 2 real processes). Regression: mesh=None meant make_mesh() over every
    process's devices, and a lone process waited forever in its collectives."""
    import jax

    plan = kfold(37, 4, 3, seed=1)
    ll = np.random.default_rng(2).normal(-100, 10, plan.keep.shape).astype(np.float32)
    want = memorization_scores(ll, plan, mesh=mesh1())
    want_fz = feldman_zhang(ll < -100, plan, mesh=mesh1())
    mine = devices8[2:4]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: list(mine))
    got = memorization_scores(ll, plan)
    got_fz = feldman_zhang(ll < -100, plan)
    for out in (got.M, got_fz.mem):
        assert out.sharding.device_set == set(mine)
    # row-wise kernels on 2 devices instead of 1: float reassociation only
    np.testing.assert_allclose(np.asarray(got.M), np.asarray(want.M), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.stderr), np.asarray(want.stderr), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_fz.mem), np.asarray(want_fz.mem), rtol=1e-6)


def test_plan_and_array_agree():
    plan = kfold(37, 4, 3, seed=0)
    ll = np.random.default_rng(0).normal(size=plan.keep.shape).astype(np.float32)
    a = memorization_scores(ll, plan, mesh=mesh1())
    b = memorization_scores(ll, plan.keep, mesh=mesh1(), quantile=0.5)
    np.testing.assert_array_equal(np.asarray(a.M), np.asarray(b.M))
    assert int(np.asarray(b.highly_memorized).sum()) == 18  # above the median of 37


# -------------------------------------------------------------------- errors
def test_nonfinite_names_model_and_example():
    plan = kfold(10, 2, 1, seed=0)
    ll = np.zeros(plan.keep.shape, dtype=np.float32)
    ll[1, 5] = np.nan
    ll[0, 7] = -np.inf
    with pytest.raises(ValueError) as e:
        memorization_scores(ll, plan, mesh=mesh1())
    msg = str(e.value)
    assert "NaN or inf" in msg and "2 entries" in msg
    assert "(model 0, example 7)" in msg and "(model 1, example 5)" in msg
    with pytest.raises(ValueError, match=r"\(model 1, example 5\)"):
        feldman_zhang(ll, plan, mesh=mesh1())


def test_shape_coverage_and_option_errors():
    plan = kfold(10, 2, 1, seed=0)
    ll = np.zeros(plan.keep.shape, dtype=np.float32)
    with pytest.raises(ValueError, match=r"shape \(2, 9\) but keep has shape \(2, 10\)"):
        memorization_scores(ll[:, :9], plan)
    keep = plan.keep.copy()
    keep[:, 3] = True
    with pytest.raises(ValueError, match=r"no model holds out 1 example: \[3\]"):
        memorization_scores(ll, keep)
    with pytest.raises(ValueError, match="boolean"):
        memorization_scores(ll, keep.astype(np.float32))
    with pytest.raises(ValueError, match="quantile"):
        memorization_scores(ll, plan, quantile=95)
    with pytest.raises(ValueError, match="uncertainty"):
        memorization_scores(ll, plan, uncertainty="delta")


# --------------------------------------------------------------- uncertainty
def _lognormal_ll(plan, seed, sigma=0.5):
    """ll with a known true score: exp(ll) log-normal with log E[exp(ll)] = mu +- side."""
    rng = np.random.default_rng(seed)
    n = plan.n
    mu_in = rng.normal(0, 1, n)
    mu_out = mu_in - rng.exponential(1.0, n)
    mu = np.where(plan.keep, mu_in, mu_out)
    ll = mu - sigma**2 / 2 + sigma * rng.standard_normal(plan.keep.shape) - 100.0
    return ll.astype(np.float32), mu_in - mu_out


@pytest.mark.parametrize(
    "uncertainty,n,lo,hi",
    [
        # 4,000 examples: binomial sd of a 95% rate is 0.0034; the band is ~ +-3.5 sd
        # around 0.95 (jackknife measured 0.946 with these seeds).
        ("jackknife", 4000, 0.938, 0.962),
        # 2,000 examples (sd 0.0049); the bootstrap's plug-in variance is (n-1)/n low,
        # so the band is shifted down by 0.01 (measured 0.934 at 4,000 examples).
        ("bootstrap", 2000, 0.920, 0.960),
    ],
)
def test_interval_coverage(uncertainty, n, lo, hi):
    plan = balanced_subsets(n, 80, seed=1)  # 40 in / 40 out per example
    ll, true_m = _lognormal_ll(plan, seed=2)
    s = memorization_scores(ll, plan, mesh=mesh1(), uncertainty=uncertainty, num_bootstrap=100)
    err = np.asarray(s.M) - true_m
    se = np.asarray(s.stderr)
    coverage = np.mean(np.abs(err) <= 1.96 * se)
    assert lo <= coverage <= hi, coverage
    # and the standard error is the right size, not merely wide enough
    assert abs(se.mean() / err.std() - 1) < 0.06


def test_welch_dof_and_t_interval_match_reference():
    plan = kfold(37, 10, 2, seed=5)  # 18 in / 2 out: a t quantile far from 1.96
    rng = np.random.default_rng(5)
    ll = rng.normal(-20, 2, plan.keep.shape).astype(np.float32)
    s = memorization_scores(ll, plan, mesh=mesh1())
    _, _, vu, vv = reference_jackknife(ll, plan.keep)
    n_in, n_out = plan.in_counts(), plan.out_counts()
    dof = (vu + vv) ** 2 / (vu**2 / (n_in - 1) + vv**2 / (n_out - 1))  # Welch-Satterthwaite
    np.testing.assert_allclose(np.asarray(s.dof), dof, rtol=1e-4)
    lo, hi = s.interval(0.9)
    half = stats.t.ppf(0.95, dof) * np.sqrt(vu + vv)
    M = np.asarray(s.M, dtype=np.float64)
    np.testing.assert_allclose(lo, M - half, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hi, M + half, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="level"):
        s.interval(95)


def _t_coverage(plan):
    """(coverage of the true scores by 95% t intervals, the scores, the true scores) on
    :func:`_lognormal_ll`'s data, seed 2."""
    ll, true_m = _lognormal_ll(plan, seed=2)
    s = memorization_scores(ll, plan, mesh=mesh1())
    lo, hi = s.interval(0.95)
    return np.mean((lo <= true_m) & (true_m <= hi)), s, true_m


def test_t_interval_coverage_in_the_papers_design():
    # K = 10 folds x R = 10 repeats: 90 in / 10 out. Measured with these seeds: normal
    # intervals 0.913, t intervals 0.9385 (4,000 examples, binomial sd 0.0038). The t
    # quantile recovers most of the gap; the rest is the Jensen bias of V from 10
    # densities, (exp(sigma^2) - 1) / (2 * 10) = +0.014 nats against stderr 0.17.
    t_cov, s, true_m = _t_coverage(kfold(4000, 10, 10, seed=1))
    z_cov = np.mean(np.abs(np.asarray(s.M) - true_m) <= 1.96 * np.asarray(s.stderr))
    assert 0.925 <= t_cov <= 0.96, t_cov
    assert t_cov > z_cov + 0.01, (t_cov, z_cov)


def test_quantile_flags():
    x = np.random.default_rng(6).normal(size=101).astype(np.float32)
    flags, thr = quantile_flags(x, 0.9)
    np.testing.assert_allclose(float(thr), np.quantile(x, 0.9), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(flags), x > np.float32(thr))
    assert int(np.asarray(flags).sum()) == 10  # 101 values: 10 above the 0.9 quantile
    with pytest.raises(ValueError, match="1-D"):
        quantile_flags(x.reshape(1, -1), 0.9)
    with pytest.raises(ValueError, match="quantile"):
        quantile_flags(x, 1.5)
    # Integer scores are cast to float: the 0.95 quantile of 0..99 is 94.05.
    flags, thr = quantile_flags(np.arange(100), 0.95)
    assert float(thr) == pytest.approx(94.05, rel=1e-6)
    np.testing.assert_array_equal(np.asarray(flags), np.arange(100) >= 95)
    # The ends of [0, 1]: everything above the minimum, and nothing.
    assert int(np.asarray(quantile_flags(x, 0.0)[0]).sum()) == 100
    assert int(np.asarray(quantile_flags(x, 1.0)[0]).sum()) == 0


def test_quantile_flags_are_exact_where_the_threshold_rounds_onto_a_score():
    """Two scores a float32 ulp apart around the quantile: the float32 threshold rounded
    onto the larger, which ``scores > threshold`` then left unflagged though it lies
    above the quantile (float64 reference: numpy on the same values)."""
    import jaxmem.report

    M = np.linspace(0, 1, 31).astype(np.float32)
    M[-2], M[-1] = 1.0, np.nextafter(np.float32(1.0), np.float32(2))
    q = 0.999
    want = M > np.quantile(M.astype(np.float64), q)
    assert want.sum() == 1
    flags, _ = quantile_flags(M, q)
    np.testing.assert_array_equal(np.asarray(flags), want)
    plan = kfold(31, 2, repeats=1, seed=0)
    scores = memorization_scores(np.where(plan.keep, M, 0).astype(np.float32), plan, quantile=q,
                                 mesh=make_mesh(1))  # U = M, V = 0
    np.testing.assert_array_equal(np.asarray(scores.highly_memorized), want)
    assert jaxmem.report.summary(M, quantile=q)["num_highly_memorized"] == 1
    # q (n - 1) a hair below a whole number in float64 (0.7 * 90 = 62.99999999999999):
    # numpy's index, not a rounded one (a snap to 63 left the score 63 unflagged)
    x = np.arange(91.0, dtype=np.float32)
    want = x > np.quantile(x.astype(np.float64), 0.7)
    assert want.sum() == 28
    np.testing.assert_array_equal(np.asarray(quantile_flags(x, 0.7)[0]), want)
    assert jaxmem.report.summary(x, quantile=0.7)["num_highly_memorized"] == 28
    # near-ties at random quantiles and sizes: the flags are the float64 rule's, by rank
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 60))
        x = (1 + rng.integers(0, 4, n) * np.finfo(np.float32).eps).astype(np.float32)
        q = float(rng.choice([0.5, 0.9, 0.95, 0.99, rng.uniform()]))
        ref = x > np.quantile(x.astype(np.float64), q)
        np.testing.assert_array_equal(np.asarray(quantile_flags(x, q)[0]), ref, err_msg=f"n={n} q={q}")


# ------------------------------------------------------------ Feldman & Zhang
def test_feldman_zhang_hand_computed():
    # models x examples; example 0: in = {0, 1}, out = {2, 3}; example 1: out = {1} only
    keep = np.array([[1, 1], [1, 0], [0, 1], [0, 1]], dtype=bool)
    correct = np.array([[1, 1], [1, 1], [0, 0], [1, 1]], dtype=bool)
    fz = feldman_zhang(correct, keep, mesh=mesh1())
    # example 0: 2/2 in-models correct, 1/2 out-models correct -> 1 - 0.5 = 0.5;
    # s_in^2 = 0, s_out^2 = var([0, 1], ddof=1) = 0.5 -> se = sqrt(0.5 / 2) = 0.5.
    # example 1: in-models {0, 2, 3} correct 2/3, the out-model correct -> -1/3; se NaN.
    np.testing.assert_allclose(np.asarray(fz.mem), [0.5, -1 / 3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fz.mean_in), [1.0, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fz.mean_out), [0.5, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(fz.n_in), [2, 3])
    np.testing.assert_array_equal(np.asarray(fz.n_out), [2, 1])
    np.testing.assert_allclose(np.asarray(fz.stderr)[0], 0.5, rtol=1e-6)
    assert np.isnan(np.asarray(fz.stderr)[1])


def test_feldman_zhang_refuses_positive_log_probs_naming_them():
    plan = kfold(6, 2, 1, seed=0)
    logp = np.full(plan.keep.shape, -1.0, dtype=np.float32)
    logp[1, 4] = 1.0  # a 0/1 float array, say, instead of bool correctness
    for values in (logp, jnp.asarray(logp)):
        with pytest.raises(ValueError, match=r"positive at 1 entry \(model, example\): \(model 1, example 4\)=1.0"):
            feldman_zhang(values, plan, mesh=mesh1())


def test_feldman_zhang_log_prob_variant_matches_numpy():
    plan = kfold(37, 4, 3, seed=4)
    rng = np.random.default_rng(4)
    logp = (-np.abs(rng.normal(0, 2, plan.keep.shape)) - 1e3 * (rng.random(plan.keep.shape) < 0.1)).astype(np.float32)
    fz = feldman_zhang(logp, plan, mesh=mesh1())
    x = logp.astype(np.float64)
    for i in range(plan.n):
        a, b = x[plan.keep[:, i], i], x[~plan.keep[:, i], i]
        np.testing.assert_allclose(float(fz.mem[i]), a.mean() - b.mean(), rtol=1e-5, atol=1e-3)
        se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        np.testing.assert_allclose(float(fz.stderr[i]), se, rtol=1e-5, atol=1e-4)


def test_quantile_flags_and_bootstrap_count_refuse_bad_values():
    with pytest.raises(ValueError, match="non-finite"):
        quantile_flags(np.array([0.1, np.nan, 0.3]), 0.95)
    with pytest.raises(TypeError, match="scores must be real numbers .* got dtype bool"):
        quantile_flags(np.arange(10) > 5, 0.95)
    with pytest.raises(ValueError, match="no scores"):
        quantile_flags(np.zeros(0), 0.95)
    ll = np.zeros((4, 3))
    keep = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1], [0, 1, 0]], bool)
    with pytest.raises(ValueError, match="num_bootstrap must be an integer"):
        memorization_scores(ll, keep, uncertainty="bootstrap", num_bootstrap=2.5)


def test_option_kinds_are_refused_by_name():
    import jax

    ll = np.zeros((4, 3), np.float32)
    keep = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1], [0, 1, 0]], bool)
    for bad in (0, "junk", jax.random.split(jax.random.key(0), 3)):
        for unc in ("jackknife", "bootstrap"):
            with pytest.raises(ValueError, match=r"key must be one PRNG key, jax.random.key\(seed\), or None"):
                memorization_scores(ll, keep, uncertainty=unc, key=bad)
    for bad in (None, "10", 0, -5, float("inf")):
        with pytest.raises(ValueError, match="num_bootstrap must be an integer, at least 2 with uncertainty='boot"):
            memorization_scores(ll, keep, uncertainty="bootstrap", num_bootstrap=bad)
    with pytest.raises(ValueError, match="num_bootstrap must be an integer, at least 1 "):
        memorization_scores(ll, keep, num_bootstrap=-5)
    for bad in (None, [0.9], "0.9", True, np.array([0.9, 0.95]), float("nan"), 1.5):
        with pytest.raises(ValueError, match=r"quantile must be a real number in \[0, 1\]"):
            memorization_scores(ll, keep, quantile=bad)
        with pytest.raises(ValueError, match=r"quantile must be a real number in \[0, 1\]"):
            quantile_flags(np.arange(3.0), bad)
    # accepted: a raw key, 0-d and numpy quantiles, whole-number replicate counts, num_bootstrap unused
    s = memorization_scores(ll, keep, uncertainty="bootstrap", num_bootstrap=np.int64(3), key=jax.random.PRNGKey(1),
                            quantile=np.float32(0.5))
    assert s.M.shape == (3,)
    assert float(quantile_flags(np.arange(5.0), jnp.asarray(0.5))[1]) == 2.0
    assert memorization_scores(ll, keep, num_bootstrap=1, quantile=1).M.shape == (3,)


def test_float64_log_likelihoods_keep_their_differences_in_float32():
    """Float64 ll of -1e6 nats (float32 spacing 0.06 nats there) computed with x64 off:
    each example is shifted by its largest value in float64 first, so M is exact to
    float32 rounding of the differences (measured 1.6e-7; unshifted it was off by 0.023
    on M ~ 0.1). Tolerance 1e-5 nats: float32 rounding of differences of ~0.1."""
    rng = np.random.default_rng(0)
    plan = kfold(20, 5, repeats=4, seed=0)
    keep = np.asarray(plan.keep)
    ll = rng.normal(-1e6, 0.05, keep.shape)
    ll[keep] += 0.1
    s = memorization_scores(ll, plan, mesh=make_mesh(1))
    U = np.array([logsumexp(ll[keep[:, i], i]) - np.log(keep[:, i].sum()) for i in range(20)])
    V = np.array([logsumexp(ll[~keep[:, i], i]) - np.log((~keep[:, i]).sum()) for i in range(20)])
    np.testing.assert_allclose(np.asarray(s.M), U - V, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s.U), U, rtol=1e-7)  # U, V: float32 values of -1e6


def _reference_bootstrap_var(ll, keep, key, num_bootstrap):
    """Float64 variances of the in- and out-side log-mean-exps over bootstrap replicates
    drawn with the resampling indices :func:`jaxmem.scores._bootstrap_var` documents
    (per example ``fold_in(key, i)``, per replicate ``fold_in(., b)``, 16-bit draws)."""
    import jax

    models, n = ll.shape
    half_words = -(-models // 2)
    var = np.empty((n, 2))
    for i in range(n):
        k = jax.random.fold_in(key, i)
        bits = np.asarray(jax.vmap(lambda b, k=k: jax.random.bits(jax.random.fold_in(k, b), (half_words,), jnp.uint32))(
            jnp.arange(num_bootstrap)))
        r = np.concatenate([bits & 0xFFFF, bits >> 16], axis=1)[:, :models].astype(np.int64)
        xs = ll[np.argsort(~keep[:, i], kind="stable"), i].astype(np.float64)  # in-models first
        n_in = int(keep[:, i].sum())
        pos_in = (r[:, :n_in] * n_in) >> 16
        pos_out = n_in + ((r[:, n_in:] * (models - n_in)) >> 16)
        var[i] = [np.var(logsumexp(xs[pos_in], axis=1), ddof=1), np.var(logsumexp(xs[pos_out], axis=1), ddof=1)]
    return var[:, 0], var[:, 1]


def test_bootstrap_exact_when_one_value_dominates_a_side():
    """A replicate that misses a value ~90 nats above the rest of its side once summed only
    float32-underflowed terms (log 0 = -inf, stderr NaN); each replicate is now shifted by
    the largest value it drew. Compared with a float64 bootstrap of the same indices."""
    import jax

    plan = kfold(37, 4, 3, seed=0)  # 9 in / 3 out per example
    keep = plan.keep
    rng = np.random.default_rng(7)
    ll = rng.normal(-500, 1, keep.shape)
    ins, outs = np.flatnonzero(keep[:, 0]), np.flatnonzero(~keep[:, 1])
    ll[ins[1:], 0] -= 90  # example 0: one in-model 90 nats above the other in-models
    ll[outs[1:], 1] -= 120  # example 1: one out-model 120 nats above the other out-models
    ll[ins[::2], 2] = -1e5 + ll[ins[::2], 2]  # example 2: in-values at -500 and at -1e5
    ll = ll.astype(np.float32)
    s = memorization_scores(ll, plan, mesh=mesh1(), uncertainty="bootstrap", num_bootstrap=50)
    var_in, var_out = _reference_bootstrap_var(ll, keep, jax.random.key(0), 50)
    assert np.isfinite(np.asarray(s.stderr)).all() and np.isfinite(np.asarray(s.dof)).all()
    # float32 one-pass variance of replicates (sum of d and d^2, |d| <= ~120): ~1e-6 relative
    # per sum; 1e-4 relative leaves room for the cancellation in sum_d2 - sum_d^2 / B.
    np.testing.assert_allclose(np.asarray(s.stderr), np.sqrt(var_in + var_out), rtol=1e-4)
    assert float(s.stderr[0]) > 20 and float(s.stderr[1]) > 20  # the misses are in there
    n_in, n_out = plan.in_counts(), plan.out_counts()
    dof = (var_in + var_out) ** 2 / (var_in**2 / (n_in - 1) + var_out**2 / (n_out - 1))
    np.testing.assert_allclose(np.asarray(s.dof), dof, rtol=1e-3)  # a ratio of squares of the above


def test_feldman_zhang_integer_correctness_is_refused_naming_both_kinds():
    # 0/1 integers: the message names both accepted kinds, so the caller converts to bool
    # (converting to float instead would be refused a second time, as positive log-probs).
    keep = np.array([[1, 1], [1, 0], [0, 1], [0, 1]], dtype=bool)
    correct = np.array([[1, 1], [1, 1], [0, 0], [1, 1]], dtype=np.int64)
    message = (r"correct_or_logp must be floats \(log p\(y\|x\) of the true label, nats\) "
               r"or bool \(correctness; 0/1 integers: pass \.astype\(bool\)\), got dtype int64")
    with pytest.raises(TypeError, match=message):
        feldman_zhang(correct, keep, mesh=mesh1())
    np.testing.assert_allclose(np.asarray(feldman_zhang(correct.astype(bool), keep, mesh=mesh1()).mem), [0.5, -1 / 3])
    with pytest.raises(TypeError, match=r"ll must be a floating array \(nats\), got dtype int64"):
        memorization_scores(correct, keep, mesh=mesh1())  # the scores' message is unchanged


def test_t_interval_undercovers_with_two_out_models():
    # The docstring's 18 / 2 row (jaxmem run's default, 10 folds x 2 repeats): the t
    # interval covers 0.882 with these seeds (4,000 examples, binomial sd 0.005), far below
    # 0.95: V's variance from 2 values and its Jensen bias (+0.06 nats).
    t_cov, _, _ = _t_coverage(kfold(4000, 10, 2, seed=1))
    assert 0.86 <= t_cov <= 0.90, t_cov


def test_bootstrap_keys_of_other_implementations_are_refused():
    """The bootstrap's per-example fold_in streams of an rbg key depend on the mesh (the
    standard errors moved by 0.18 between 1 and 2 devices); such keys are refused by
    name. Raw threefry key data resample exactly as the typed key."""
    import jax

    rng = np.random.default_rng(0)
    ll = rng.normal(-5, 1, size=(6, 9)).astype(np.float32)
    keep = np.array([[i % 3 != f for i in range(9)] for f in (0, 1, 2, 0, 1, 2)])
    for impl in ("rbg", "unsafe_rbg"):
        with pytest.raises(ValueError, match=f"key must be a threefry2x32 key, got a {impl} key: the bootstrap"):
            memorization_scores(ll, keep, uncertainty="bootstrap", key=jax.random.key(0, impl=impl))
    with pytest.raises(ValueError, match=r"got uint32\[4\], the raw data of an rbg key"):
        memorization_scores(ll, keep, uncertainty="bootstrap", key=jax.random.key_data(jax.random.key(0, impl="rbg")))
    typed = memorization_scores(ll, keep, uncertainty="bootstrap", num_bootstrap=50, key=jax.random.key(3))
    raw = memorization_scores(ll, keep, uncertainty="bootstrap", num_bootstrap=50,
                              key=jax.random.key_data(jax.random.key(3)))
    np.testing.assert_array_equal(np.asarray(typed.stderr), np.asarray(raw.stderr))
