"""Models: shapes, configs, and every likelihood term against an independent reference."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from jaxmem import models
from jaxmem.models._latent import sample_noise, softplus
from jaxmem.models.vae import logit_gaussian_log_density


def call(model, method, *args, **static):
    """``model.method(*args)`` as one jitted program (eager NNX dispatches op by op: slow)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, *a: getattr(nnx.merge(graphdef, st), method)(*a, **static))
    return fn(state, *args)


def _keys(n, seed=0):
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))


CASES = [
    ("mlp_vae", (8, 8), dict(hidden=[32, 16], latent_dim=4)),
    ("conv_vae", (8, 8, 3), dict(channels=[4, 8], dense=16, latent_dim=4)),
    ("linear_gaussian_vae", (6,), dict(latent_dim=2)),
    ("classifier", (8, 8), dict(hidden=[16], num_classes=3)),
]


def _batch(name, shape, n=5):
    x = jax.random.uniform(jax.random.key(1), (n, *shape))
    if name == "classifier":
        return x, jnp.arange(n, dtype=jnp.int32) % 3
    return x


@pytest.mark.parametrize("name,shape,kw", CASES)
def test_interface_shapes_and_config(name, shape, kw):
    model = models.create(name, shape, seed=0, **kw)
    batch = _batch(name, shape)
    graphdef, state = nnx.split(model)

    @jax.jit
    def all_three(state, batch, key, keys):
        m = nnx.merge(graphdef, state)
        return m.loss(batch, key), m.log_prob(batch, keys, 3), m.elbo(batch, keys)

    for v in all_three(state, batch, jax.random.key(2), _keys(5)):
        assert v.shape == (5,) and v.dtype == jnp.float32 and np.all(np.isfinite(v))
    # the config round-trips through JSON and rebuilds the same parameters
    cfg = models.model_config(name, shape, **kw)
    again = models.from_config(json.loads(json.dumps(cfg)), seed=0)
    a, b = nnx.state(model, nnx.Param), nnx.state(again, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # a wrong shape is refused with the expected shape in the message
    wrong = jnp.zeros((5, 7)) if name != "classifier" else (jnp.zeros((5, 7)), batch[1])
    with pytest.raises(ValueError, match="batch of shape"):
        model.loss(wrong, jax.random.key(0))


def test_config_errors():
    with pytest.raises(ValueError, match="unknown model"):
        models.create("gan", (4,), seed=0)
    with pytest.raises(ValueError, match="unknown option"):
        models.create("mlp_vae", (4,), seed=0, hiden=[3])
    with pytest.raises(ValueError, match="one PRNG key per example"):
        models.create("linear_gaussian_vae", (4,), seed=0).log_prob(jnp.zeros((3, 4)), _keys(2), 4)
    assert models.model_config("mlp_vae", (32, 32))["hidden"] == [1024, 512, 256]


def test_config_integer_options_and_numpy_values():
    # Sizes must be integers: a float is refused by name, not truncated (4.5 -> 4).
    with pytest.raises(ValueError, match=r"example_shape .* integers, got \(4\.5, 4\)"):
        models.create("mlp_vae", (4.5, 4), seed=0)
    with pytest.raises(ValueError, match=r"'hidden' of model 'mlp_vae' must be a sequence of integers, got \[8\.5\]"):
        models.model_config("mlp_vae", (4, 4), hidden=[8.5])
    with pytest.raises(ValueError, match="'latent_dim' of model 'mlp_vae' must be an integer, got True"):
        models.model_config("mlp_vae", (4, 4), latent_dim=True)
    with pytest.raises(ValueError, match="'dense' of model 'conv_vae' must be an integer, got 16.0"):
        models.model_config("conv_vae", (8, 8, 3), dense=16.0)
    with pytest.raises(ValueError, match="'channels' .* got 4"):
        models.model_config("conv_vae", (8, 8, 3), channels=4)
    # numpy integers, floats, strings and arrays are stored as Python values (JSON-serialisable).
    cfg = models.model_config("conv_vae", np.array([8, 8, 3]), channels=np.array([4, 8]), dense=np.int64(16),
                              latent_dim=np.int32(4), lam=np.float32(0.25), dequantize=np.str_("uniform"))
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["example_shape"] == [8, 8, 3] and cfg["channels"] == [4, 8] and cfg["lam"] == 0.25
    assert type(cfg["dense"]) is int and type(cfg["latent_dim"]) is int and type(cfg["lam"]) is float
    assert models.model_config("mlp_vae", (4, 4), latent_dim=np.int64(2))["latent_dim"] == 2


def test_mlp_vae_log_weights_match_float64_numpy():
    """log p(x,z) - log q(z|x) against a float64 numpy forward pass with the same noise."""
    model = models.create("mlp_vae", (4, 4), seed=3, hidden=[8, 6], latent_dim=3, binarize="none")
    x = (jax.random.uniform(jax.random.key(4), (4, 4, 4)) > 0.5).astype(jnp.float32)
    keys = _keys(4)
    graphdef, state = nnx.split(model)

    @jax.jit
    def weights_and_noise(state, x, keys):
        m = nnx.merge(graphdef, state)
        xp, q = m.prepare(x, keys)
        return m.log_weights(xp, q, keys, jnp.arange(5)), sample_noise(keys, jnp.arange(5), 3)

    got, eps = weights_and_noise(state, x, keys)

    p = nnx.state(model, nnx.Param)
    enc = [(np.float64(layer["kernel"][...]), np.float64(layer["bias"][...])) for layer in p["encoder"].values()]
    dec = [(np.float64(layer["kernel"][...]), np.float64(layer["bias"][...])) for layer in p["decoder"].values()]

    def mlp(layers, h):
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            h = np.maximum(h, 0) if i < len(layers) - 1 else h
        return h

    xs = np.float64(x).reshape(4, -1)
    head = mlp(enc, xs)
    mu, std = head[:, :3], np.logaddexp(0, head[:, 3:]) + 1e-4
    eps = np.float64(eps)
    z = mu[:, None] + std[:, None] * eps
    logits = mlp(dec, z.reshape(-1, 3)).reshape(4, 5, -1)
    log_px_z = np.sum(xs[:, None] * logits - np.logaddexp(0, logits), -1)
    log_pz = stats.norm.logpdf(z).sum(-1)
    log_q = stats.norm.logpdf(z, mu[:, None], std[:, None]).sum(-1)
    # float32 forward pass of a 16-8-6-6 MLP: errors ~1e-6 relative on ~10-nat values
    np.testing.assert_allclose(got, log_pz + log_px_z - log_q, rtol=1e-5, atol=1e-4)


def test_samples_do_not_depend_on_chunking_and_log_prob_is_logmeanexp():
    model = models.create("mlp_vae", (4, 4), seed=0, hidden=[8], latent_dim=2)
    x = jax.random.uniform(jax.random.key(5), (3, 4, 4))
    keys = _keys(3)
    graphdef, state = nnx.split(model)

    @jax.jit
    def everything(state, x, keys):
        m = nnx.merge(graphdef, state)
        whole = sample_noise(keys, jnp.arange(12), 2)
        parts = jnp.concatenate([sample_noise(keys, jnp.arange(i, i + 4), 2) for i in (0, 4, 8)], 1)
        xp, q = m.prepare(x, keys)
        xp_again, _ = m.prepare(x, keys)
        return (whole, parts, xp, xp_again, m.log_weights(xp, q, keys, jnp.arange(12)),
                m.log_prob(x, keys, 12), m.elbo(x, keys, 12))

    whole, parts, xp, xp_again, lw, lp, elbo = everything(state, x, keys)
    # sample s's noise is the same whichever other samples are drawn with it
    np.testing.assert_array_equal(whole, parts)
    ref = jax.scipy.special.logsumexp(np.float64(lw), axis=1) - math.log(12)
    np.testing.assert_allclose(lp, ref, rtol=1e-6)
    # IW >= ELBO on the same samples, example by example (Jensen)
    assert np.all(lp >= elbo - 1e-5)
    # dynamic binarisation is seeded by the per-example key: reproducible, and binary
    np.testing.assert_array_equal(xp, xp_again)
    assert set(np.unique(xp)) <= {0.0, 1.0}


def test_logit_gaussian_density_integrates_to_its_gaussian_mass():
    """The logit transform's Jacobian is right iff each pixel's density over u in (0, 1)
    integrates to the Gaussian's mass over the image of (0, 1), [logit(lam), logit(1-lam)]
    (the paper's likelihood leaks the mass outside it, so it is sub-normalised). The
    last case is a trained decoder's black pixel: a narrow Gaussian at the interval's
    end (dequantised black pixels lie within 0.072 of it), which loses over a third of
    its mass, 0.46 nats per pixel: not the slight shortfall of N(0, 1) (0.0033)."""
    lam = 0.05
    u = np.concatenate([np.linspace(0.0, 0.01, 200_001), np.linspace(0.01, 1.0, 200_001)[1:]])
    y_lo, y_hi = math.log(lam / (1 - lam)), math.log((1 - lam) / lam)
    for mean, std in [(0.0, 1.0), (2.0, 0.3), (-1.5, 0.05), (y_lo + 0.01, 0.03)]:
        dens = np.exp(np.float64(logit_gaussian_log_density(jnp.asarray(u), mean, std, lam)))
        mass = stats.norm.cdf(y_hi, mean, std) - stats.norm.cdf(y_lo, mean, std)
        # trapezoid on a 5e-8 grid near u = 0 (where the narrow Gaussian lies) and a 5e-6
        # grid above, of a smooth density: error << 1e-4
        np.testing.assert_allclose(np.trapezoid(dens, u), mass, atol=1e-4)
    assert 0.6 < mass < 0.65  # the edge case: 0.63, so 0.46 nats lost per such pixel


def test_conv_vae_dequantization_and_density_space():
    model = models.create("conv_vae", (8, 8, 3), seed=0, channels=[4, 8], dense=16, latent_dim=4)
    levels = jax.random.randint(jax.random.key(0), (4, 8, 8, 3), 0, 256)
    x = levels / 255.0
    keys = _keys(4)
    u, _ = call(model, "prepare", x, keys)
    # dequantised values stay in their pixel's bin [k/256, (k+1)/256)
    np.testing.assert_array_equal(np.floor(np.asarray(u) * 256), np.asarray(levels))
    # log p(x|z) is the sum of per-pixel logit-Gaussian densities, moved to the 256 scale
    z = jnp.zeros((4, 1, 4))
    d = 8 * 8 * 3
    got = call(model, "log_likelihood", u, z)[:, 0]

    def decoder_output(m, z):
        h = jax.nn.relu(m.dec_dense(z[:, 0]))
        h = jax.nn.relu(m.dec_expand(h)).reshape(4, 2, 2, 8)
        return m.dec_convs[1](jax.nn.relu(m.dec_convs[0](h)))

    h = nnx.jit(decoder_output)(model, z)
    mean, std = h[..., :3], jax.nn.softplus(h[..., 3:]) + 1e-3
    ref = np.sum(np.float64(logit_gaussian_log_density(u, mean, std, 0.05)), axis=(1, 2, 3))
    np.testing.assert_allclose(got, ref - d * math.log(256), rtol=1e-5)


def test_linear_gaussian_closed_forms_against_scipy():
    model = models.create("linear_gaussian_vae", (5,), seed=1, latent_dim=2, init_log_sigma=-0.5)
    model.b[...] = jnp.arange(5.0) / 5
    x = jax.random.normal(jax.random.key(0), (7, 5))
    w, b, s2 = np.float64(model.W[...]), np.float64(model.b[...]), math.exp(-1.0)
    cov = w @ w.T + s2 * np.eye(5)
    ref = stats.multivariate_normal(b, cov).logpdf(np.float64(x))
    # float32 k x k form on a well-conditioned covariance: ~1e-6 relative
    np.testing.assert_allclose(call(model, "exact_log_prob", x), ref, rtol=1e-5)
    a, c, chol = (np.float64(v) for v in call(model, "exact_posterior"))
    post_cov = np.linalg.inv(np.eye(2) + w.T @ w / s2)
    np.testing.assert_allclose(chol @ chol.T, post_cov, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, post_cov @ w.T / s2, rtol=1e-5, atol=1e-6)
    # with the exact posterior every importance weight is p(x): even S = 1 is exact
    model.set_exact_posterior()
    keys = _keys(7)
    xp, q = call(model, "prepare", x, keys)
    lw = call(model, "log_weights", xp, q, keys, jnp.arange(8))
    np.testing.assert_allclose(lw, np.broadcast_to(ref[:, None], (7, 8)), rtol=1e-5)


def test_training_loss_is_negative_elbo_in_expectation():
    """The closed-form KL in `loss` agrees with the sampled ELBO (full and diagonal q)."""
    for name, shape, kw in [("linear_gaussian_vae", (4,), dict(latent_dim=2)),
                            ("mlp_vae", (3, 3), dict(hidden=[8], latent_dim=2, binarize="none"))]:
        model = models.create(name, shape, seed=0, **kw)
        if name == "linear_gaussian_vae":
            model.L_raw[...] = jnp.array([[0.3, 0.0], [0.5, -0.4]])  # a non-diagonal q
        x = jnp.round(jax.random.uniform(jax.random.key(1), (1, *shape)))
        n = 4000
        graphdef, state = nnx.split(model)
        losses = jax.jit(jax.vmap(lambda k: nnx.merge(graphdef, state).loss(x, k)[0]))(
            jax.random.split(jax.random.key(2), n))
        elbo = call(model, "elbo", x, _keys(1), num_samples=n)[0]
        # both are unbiased for the ELBO; 5 standard errors of the loss average
        tol = 5 * float(jnp.std(losses)) / math.sqrt(n) + 0.05
        assert abs(float(jnp.mean(losses)) + float(elbo)) < tol, (name, jnp.mean(losses), elbo)


def test_classifier_matches_log_softmax():
    model = models.create("classifier", (6,), seed=0, hidden=[10], num_classes=4)
    x = jax.random.normal(jax.random.key(0), (9, 6))
    y = jnp.arange(9, dtype=jnp.int32) % 4
    p = nnx.state(model, nnx.Param)["layers"]
    h = np.maximum(np.float64(x) @ np.float64(p[0]["kernel"][...]) + np.float64(p[0]["bias"][...]), 0)
    logits = h @ np.float64(p[1]["kernel"][...]) + np.float64(p[1]["bias"][...])
    ref = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    np.testing.assert_allclose(call(model, "log_prob", (x, y), _keys(9)), ref[np.arange(9), y], rtol=1e-5, atol=1e-6)
    loss = call(model, "loss", (x, y), jax.random.key(0))
    np.testing.assert_allclose(loss, -ref[np.arange(9), y], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(call(model, "correct", (x, y)), np.argmax(logits, 1) == np.asarray(y))
    with pytest.raises(ValueError, match="labels must be int"):
        model.loss((x, jnp.zeros(9)), jax.random.key(0))


def test_classifier_out_of_range_label_is_nan_not_another_class():
    model = models.create("classifier", (6,), seed=0, hidden=[10], num_classes=4)
    x = jax.random.normal(jax.random.key(0), (4, 6))
    y = jnp.asarray([0, 3, -1, 4], jnp.int32)  # -1 once read class 3 silently
    lp = np.asarray(call(model, "log_prob", (x, y), _keys(4)))
    assert np.all(np.isfinite(lp[:2])) and np.all(np.isnan(lp[2:])), lp
    assert np.all(np.isnan(np.asarray(call(model, "loss", (x, y), jax.random.key(0)))[2:]))


def test_softplus_matches_float64_with_its_infinities_and_gradient():
    # float32 rounding of log1p/exp: a few ulp of the value; absolute 1.2e-38 (the smallest
    # normal float32) because XLA flushes subnormal results, such as exp(-100), to zero.
    x = np.concatenate([np.linspace(-100, 100, 20001), [-1e30, -88.7, -1e-20, 0.0, 1e-20, 15.9, 1e30]])
    x = x.astype(np.float32)
    ref = np.logaddexp(x.astype(np.float64), 0.0)
    got = np.asarray(softplus(jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(got, ref, rtol=4e-7, atol=1.2e-38)
    np.testing.assert_allclose(got, np.asarray(jax.nn.softplus(jnp.asarray(x)), np.float64), rtol=4e-7, atol=1.2e-38)
    inf = jnp.asarray([-jnp.inf, jnp.inf, jnp.nan], jnp.float32)
    np.testing.assert_array_equal(np.asarray(softplus(inf)), [0.0, np.inf, np.nan])
    grad = np.asarray(jax.vmap(jax.grad(softplus))(jnp.asarray(x)), np.float64)
    with np.errstate(over="ignore"):
        sigmoid = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(grad, sigmoid, rtol=1e-6, atol=1.2e-38)
    np.testing.assert_array_equal(np.asarray(jax.vmap(jax.grad(softplus))(inf[:2])), [0.0, 1.0])
    assert float(jax.grad(jax.grad(softplus))(0.0)) == 0.25  # sigmoid'(0), through the custom derivative


def test_dense_matches_linear_and_its_gradients_match_autodiff():
    """``_latent.dense`` (hand-written backward pass) against nnx.Linear and plain autodiff.

    Forward: the same expression as nnx.Linear, so equal to float32 rounding. Backward:
    the kernel gradient h^T g, laid out [in, out], and the input and bias gradients,
    against ``jax.grad`` of the plain product in float64 (tolerance 1e-12 relative: the
    only difference is the order of the sums), on a 3-D input (leading batch axes flatten).
    """
    from jaxmem.models._latent import dense

    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(0)
        h = jnp.asarray(rng.normal(size=(2, 5, 7)))
        k = jnp.asarray(rng.normal(size=(7, 3)))
        b = jnp.asarray(rng.normal(size=(3,)))
        w = jnp.asarray(rng.normal(size=(2, 5, 3)))

        def loss(f):
            return lambda h, k, b: jnp.sum(jnp.tanh(f(h, k, b)) * w)

        ours = jax.grad(loss(dense), argnums=(0, 1, 2))(h, k, b)
        ref = jax.grad(loss(lambda h, k, b: h @ k + b), argnums=(0, 1, 2))(h, k, b)
        for a, r in zip(ours, ref):
            assert a.shape == r.shape and a.dtype == r.dtype
            np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", False)
    lin = nnx.Linear(7, 3, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 7)), jnp.float32)
    np.testing.assert_allclose(dense(x, lin.kernel[...], lin.bias[...]), lin(x), rtol=1e-6, atol=1e-6)


def test_models_keep_forward_mode_autodiff_outside_the_training_step():
    """run_layers uses the reverse-mode-only ``dense`` only inside ``reverse_mode_dense``
    (the ensemble's training step): elsewhere a model's loss has forward-mode derivatives
    (jax.jvp, as forward-over-reverse Hessian-vector products need), and both paths give
    the same loss and the same gradient (float32 rounding)."""
    from jaxmem.models._latent import reverse_mode_dense

    # the MLP VAE, and the conv VAE, whose dense layers (not its convolutions) take the same path
    for name, shape, kw in [("mlp_vae", (4, 4), {"hidden": [8], "latent_dim": 2}),
                            ("conv_vae", (8, 8, 3), {"channels": [4, 8], "dense": 16, "latent_dim": 2})]:
        model = models.create(name, shape, seed=0, **kw)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        x = jnp.asarray((np.random.default_rng(0).random((3, *shape)) < 0.5), jnp.float32)
        key = jax.random.key(1)

        def loss(p, graphdef=graphdef, rest=rest, x=x, key=key):
            return jnp.mean(nnx.merge(graphdef, p, rest).loss(x, key))

        tangent = jax.tree.map(jnp.ones_like, params)
        # each jitted function is a fresh object, so it is traced (and the context read) anew
        forward = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))
        value, slope = forward(params, tangent)  # forward mode works
        grad_plain = jax.jit(jax.grad(loss))(params)
        with reverse_mode_dense():
            np.testing.assert_allclose(jax.jit(loss)(params), value, rtol=1e-6)
            grad_fast = jax.jit(jax.grad(loss))(params)
            with pytest.raises(TypeError, match="custom_vjp"):
                jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(params, tangent)
        for a, b in zip(jax.tree.leaves(grad_plain), jax.tree.leaves(grad_fast)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert np.isfinite(float(slope))


def test_training_gradients_keep_the_parameters_dtypes_under_x64():
    """With x64 on, float64 data makes the cotangents reaching ``dense``'s backward pass
    float64; each gradient must still come back in its primal's dtype, as autodiff gives
    them (regression: the biases' and inputs' came back float64, so Adam's moments
    changed dtype and ``ensemble.fit`` failed on float64 data). Against ``jax.grad`` of
    the same loss without the custom VJP (plain nnx.Linear): float32 rounding, 1e-5."""
    from jaxmem.models._latent import dense, reverse_mode_dense

    model = models.create("mlp_vae", (3, 3), seed=0, hidden=[8], latent_dim=2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).random((4, 3, 3)))  # float64
        key = jax.random.key(1)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p, rest).loss(x, key))

        plain = jax.jit(jax.grad(loss))(params)
        with reverse_mode_dense():
            fast = jax.jit(jax.grad(loss))(params)
        for p, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain), jax.tree.leaves(fast)):
            assert p.dtype == a.dtype == b.dtype == jnp.float32, (p.dtype, a.dtype, b.dtype)
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        # mixed dtypes in one layer: a float32 input, a float64 kernel and a float32 bias
        h, k, b = jnp.ones((2, 3), jnp.float32), jnp.ones((3, 2), jnp.float64), jnp.zeros((2,), jnp.float32)
        grads = jax.grad(lambda *a: jnp.sum(dense(*a) ** 2), argnums=(0, 1, 2))(h, k, b)
        assert [g.dtype for g in grads] == [jnp.float32, jnp.float64, jnp.float32]


def test_models_differing_only_in_their_initial_values_share_a_graphdef():
    """Options used only to initialise (the linear-Gaussian VAE's init_log_sigma) are not
    module attributes, so models trained from different starts stack into one ensemble
    (regression: loglik_matrix refused them as "differs from models[0] in structure").
    Each row is its model's exact log p(x) (exact posterior: every weight is p(x))."""
    from jaxmem.likelihood import loglik_matrix

    members = [models.create("linear_gaussian_vae", (4,), seed=0, latent_dim=2, init_log_sigma=s)
               for s in (-1.0, 0.5)]
    assert nnx.graphdef(members[0]) == nnx.graphdef(members[1])
    assert float(members[0].log_sigma[...]) == -1.0 and float(members[1].log_sigma[...]) == 0.5
    for m in members:
        m.set_exact_posterior()
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    ll = np.asarray(loglik_matrix(members, data=x, key=jax.random.key(0), num_samples=2))
    exact = np.stack([np.asarray(call(m, "exact_log_prob", jnp.asarray(x))) for m in members])
    # float32 Cholesky and sums of ~10-nat terms: ~1e-6 relative
    np.testing.assert_allclose(ll, exact, rtol=1e-5, atol=1e-4)


def _float64_log_normal(w, b, sigma, x):
    """log N(x; b, W W^T + sigma^2 I) in float64 numpy from the d x d covariance (solve, slogdet)."""
    cov = w @ w.T + sigma ** 2 * np.eye(len(b))
    r = x - b
    maha = np.einsum("ij,ij->i", r, np.linalg.solve(cov, r.T).T)
    return -0.5 * (maha + np.linalg.slogdet(cov)[1] + len(b) * math.log(2 * math.pi))


def test_linear_gaussian_exact_log_prob_where_sigma_is_small_next_to_w():
    """The oracle's exact log p(x) keeps float32 accuracy where W W^T dwarfs sigma^2
    (regression: a d x d Cholesky of W W^T + sigma^2 I formed in float32 was 149% off at
    d=20, k=3, sigma=1e-3, NaN at |W| ~ 100, 12-18 nats off at sigma=1e-2, and no better
    with x64, the covariance being formed from the float32 parameters). With x64 and
    float64 x it is float64 throughout. Reference: float64 numpy on the d x d covariance."""
    rng = np.random.default_rng(0)
    cases = []
    for d, k, sigma, scale in [(20, 3, 1e-3, 1.0), (5, 2, 1e-3, 100.0), (5, 2, 1e-2, 1.0)]:
        model = models.create("linear_gaussian_vae", (d,), seed=0, latent_dim=k)
        model.W[...] = jnp.asarray(scale * rng.normal(size=(d, k)), jnp.float32)
        model.b[...] = jnp.asarray(rng.normal(size=d), jnp.float32)
        model.log_sigma[...] = jnp.asarray(math.log(sigma), jnp.float32)
        x = rng.normal(size=(4, d))
        w, b = np.float64(model.W[...]), np.float64(model.b[...])
        ref = _float64_log_normal(w, b, math.exp(np.float64(model.log_sigma[...])), x)
        cases.append((model, x, ref))
        got = np.asarray(call(model, "exact_log_prob", jnp.asarray(x, jnp.float32)))
        assert got.dtype == np.float32
        # float32 rounding of the inputs and the k x k solve: measured <= 2.4e-7 relative;
        # the reference's own float64 d x d solve carries up to cond(C) * 1e-16 ~ 5e-6
        # (cond 5e10 for |W| ~ 100), measured 2.6e-7
        np.testing.assert_allclose(got, ref, rtol=2e-6)
    with jax.enable_x64(True):
        for i, (model, x, ref) in enumerate(cases):
            got = np.asarray(call(model, "exact_log_prob", jnp.asarray(x)))
            assert got.dtype == np.float64
            # float64 throughout: only the reference's conditioning limits the agreement
            # (2.6e-7 for |W| ~ 100, 4e-13 at cond 8e4, where float32 would give 1e-7)
            np.testing.assert_allclose(got, ref, rtol=2e-6 if i < 2 else 1e-11)
    # x drawn from the model (near its subspace): float32 is as uncertain as its input,
    # eps * d * |x - b| * |residual| / sigma^2 nats (the docstring's bound); x64 is exact
    model, _, _ = cases[2]  # d = 5, k = 2, sigma = 1e-2, cond(C) ~ 1e4
    w, b = np.float64(model.W[...]), np.float64(model.b[...])
    sigma = math.exp(np.float64(model.log_sigma[...]))
    x = b + rng.normal(size=(4, 2)) @ w.T + sigma * rng.normal(size=(4, 5))
    ref = _float64_log_normal(w, b, sigma, x)
    bound = 6e-8 * 5 * np.linalg.norm(x - b, axis=1) * (sigma * math.sqrt(5)) / sigma**2
    got = np.asarray(call(model, "exact_log_prob", jnp.asarray(x, jnp.float32)))
    assert np.all(np.abs(got - ref) <= 4 * bound + 1e-5 * np.abs(ref)), (got - ref, bound)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(call(model, "exact_log_prob", jnp.asarray(x))), ref, rtol=1e-10)


@pytest.mark.parametrize("name,shape,kw,match", [
    ("conv_vae", (8, 8, 3), dict(channels=[]), r"channels must name at least one convolution"),
    ("conv_vae", (8, 8, 3), dict(channels=[4, 0]), r"sizes must be positive, got channels=\(4, 0\)"),
    ("conv_vae", (8, 8, 3), dict(channels=[4], dense=0), r"sizes must be positive, .*dense=0"),
    ("conv_vae", (8, 8, 3), dict(channels=[4], latent_dim=0), r"sizes must be positive, .*latent_dim=0"),
    ("classifier", (4,), dict(hidden=[8, 0]), r"sizes must be positive, got hidden=\(8, 0\)"),
])
def test_conv_vae_and_classifier_refuse_sizes_that_are_not_positive(name, shape, kw, match):
    """As MLPVAE and LinearGaussianVAE do (regression: IndexError for channels=[],
    ZeroDivisionError from Flax's initializer for a zero size), through create and
    through memorization(model_options=...), before anything is trained."""
    import jaxmem

    with pytest.raises(ValueError, match=match):
        models.create(name, shape, seed=0, **kw)
    x = np.full((6, *shape), 0.5, np.float32)
    y = np.arange(6) % 2 if name == "classifier" else None
    with pytest.raises(ValueError, match=match):
        jaxmem.memorization(x, y, model=name, model_options=kw, folds=2, epochs=1, progress=False)


def test_bfloat16_data_are_scored_as_float32_data_of_the_same_values():
    """bfloat16 x is floating-point data (regression: check_model_data refused it as "takes
    floating-point x ..., got dtype bfloat16"), and the models compute in float32 from it:
    the same log p as float32 x holding the same values (regression: the conv VAE's
    logit transform ran in bfloat16, ~2 nats off). Exact equality: the same float32
    program runs once the values are converted."""
    from jaxmem.likelihood import loglik_matrix

    model = models.create("conv_vae", (8, 8, 3), seed=0, channels=[4], dense=8, latent_dim=2, dequantize="none")
    xb = np.random.default_rng(0).uniform(0.01, 0.99, (6, 8, 8, 3)).astype(jnp.bfloat16)
    ll = [np.asarray(loglik_matrix(model, data=a, key=jax.random.key(0), num_samples=2))
          for a in (xb, xb.astype(np.float32))]
    assert ll[0].dtype == np.float32
    np.testing.assert_array_equal(ll[0], ll[1])
    mlp = models.create("mlp_vae", (4, 4), seed=0, hidden=[8], latent_dim=2)
    models.check_model_data(mlp, np.full((6, 4, 4), 0.5, jnp.bfloat16))
    with pytest.raises(ValueError, match="takes floating-point x .* got dtype int32"):
        models.check_model_data(mlp, np.zeros((6, 4, 4), np.int32))
