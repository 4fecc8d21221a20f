"""Smoke tests of examples/*.py with tiny settings, plus one real check of each output."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_training_loop(capsys):
    out = load("own_training_loop").main(
        ["--limit", "120", "--folds", "2", "--repeats", "1", "--epochs", "2", "--hidden", "16", "--samples", "4",
         "--batch-size", "30"])
    assert "most memorized" in capsys.readouterr().out
    s, ll = out["scores"], out["ll"]
    assert ll.shape == (2, 120) and np.isfinite(ll).all()
    np.testing.assert_allclose(np.asarray(s.M), np.asarray(s.U) - np.asarray(s.V), atol=1e-5)
    # ll[m, i] is member m's own log_prob of example i with the key fold_in(base, i)
    # (docs/CONTRACTS.md), whatever chunks the matrix was computed in: float32 rounding.
    from jaxmem.ensemble import member

    model = member(out["graphdef"], out["members"], 1)
    idx = np.array([0, 7, 119])
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(out["seed"] + 1), i))(idx)
    direct = np.asarray(model.log_prob(out["x"][idx], keys, out["samples"]))
    np.testing.assert_allclose(ll[1, idx], direct, rtol=1e-5, atol=1e-4)


def test_label_memorization(capsys):
    out = load("label_memorization").main(
        ["--models", "4", "--epochs", "2", "--limit", "150", "--hidden", "16"])
    assert "most memorized labels" in capsys.readouterr().out
    ok, keep, right = out["scored"], out["keep"], out["correct"]
    assert ok.sum() > 50
    # Feldman & Zhang by hand from the correctness matrix the example computed.
    k, c = keep[:, ok], right[:, ok].astype(float)
    expected = (c * k).sum(0) / k.sum(0) - (c * ~k).sum(0) / (~k).sum(0)
    np.testing.assert_allclose(np.asarray(out["accuracy"].mem), expected, atol=1e-6)
    # The log p(y|x) version: same from the log-probabilities (nats, <= 0).
    lp = out["logp"][:, ok]
    assert (lp <= 0).all()
    expected = (lp * k).sum(0) / k.sum(0) - (lp * ~k).sum(0) / (~k).sum(0)
    np.testing.assert_allclose(np.asarray(out["nats"].mem), expected, rtol=1e-5, atol=1e-5)


def test_memorization_vs_leverage(capsys, tmp_path):
    fig = tmp_path / "m_vs_h.png"
    out = load("memorization_vs_leverage").main(
        ["--limit", "150", "--folds", "2", "--epochs", "2", "--hidden", "16", "--samples", "4",
         "--figure", str(fig)])
    assert "Spearman rank correlations" in capsys.readouterr().out
    assert fig.is_file()
    # The Gaussian's M is a monotone function of leverage: rank correlation exactly 1.
    assert out["rho"]["gaussian_vs_leverage"] == pytest.approx(1.0, abs=1e-12)
    # Dropped pixels are constant, hence in the intercept's span: the leverage of
    # [1, X] and of [1, varying X] (from the Gaussian's 1/n + d) agree (float64).
    ok = np.isfinite(out["M_gaussian"])
    np.testing.assert_allclose(out["leverage"][ok], out["leverage_gaussian"][ok], atol=1e-8)
    assert np.isfinite(out["M_deep"]).all() and -1 <= out["rho"]["deep_vs_leverage"] <= 1
