"""End-to-end tests of jaxmem.memorization (data -> plan -> ensemble -> ll -> scores)."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from scipy.stats import pearsonr

import jaxmem

# Full-batch Adam with a decaying step converges in a few hundred steps on this problem.
EPOCHS = 300


def _log_normal(x, mu, cov):
    L = np.linalg.cholesky(cov)
    z = np.linalg.solve(L, (x - mu).T)
    return -0.5 * (z**2).sum(0) - np.log(np.diag(L)).sum() - 0.5 * x.shape[1] * np.log(2 * np.pi)


def test_linear_gaussian_ensemble_tracks_closed_form():
    """The deep estimator, on a model whose optimum is known, agrees with the closed forms.

    Data: n = 200 heavy-tailed (Student-t, 5 dof) points in d = 3, linearly mixed. Model:
    the linear-Gaussian VAE with latent_dim = d, whose maximum-likelihood covariance
    W W^T + sigma^2 I can equal any sample covariance, so each trained member approaches
    the Gaussian MLE of its own training subset. Two references:

    * the exact K-fold estimator: the same plan, each member replaced by the closed-form
      Gaussian MLE of its training subset, scored by the same U/V/M. The ensemble should
      reproduce it up to optimisation and importance-sampling error. Measured here:
      Pearson 0.92-0.94 (full-batch Adam, S = 256); we require > 0.85.
    * the closed-form leave-one-out score of jaxmem.linear (rank-one updates). K-fold is
      not leave-one-out: the "out" model of x_i also lacks the 19 other examples of its
      fold, which moves V by an amount independent of x_i. Theory therefore predicts a
      strong correlation driven by the high-leverage tail (where the LOO score is large)
      and a weak one in the bulk (true scores ~0.02 nats, below that fold noise). The
      exact K-fold estimator itself correlates with LOO at Pearson 0.92 (Spearman 0.54)
      on this data; the ensemble measured 0.82-0.84; we require > 0.7.
    """
    rng = np.random.default_rng(0)
    n, d, k = 200, 3, 10
    x = (rng.standard_t(df=5, size=(n, d)) @ rng.normal(size=(d, d))).astype(np.float32)
    plan = jaxmem.kfold(n, k, seed=0)
    x64 = x.astype(np.float64)
    ll_exact = np.stack(
        [_log_normal(x64, x64[m].mean(0), np.cov(x64[m].T, bias=True)) for m in plan.keep]
    )
    exact_kfold = jaxmem.memorization_scores(ll_exact, plan.keep)
    loo = jaxmem.loo_log_density_ratio_gaussian(x64, dtype=np.float64)

    r = jaxmem.memorization(
        x, model="linear_gaussian_vae", model_options={"latent_dim": d}, plan=plan,
        epochs=EPOCHS, batch_size=n - n // k, num_samples=256,
        optimizer=optax.adam(optax.exponential_decay(0.1, EPOCHS, 0.01)),
        progress=False, linear_baseline=False,
    )
    # Each member's log-likelihoods sit within optimisation error of its subset's MLE
    # (measured mean |error| 0.05 nats on log p ~ -5).
    assert np.abs(r.ll - ll_exact).mean() < 0.15
    assert pearsonr(r.M, np.asarray(exact_kfold.M))[0] > 0.85
    assert pearsonr(r.M, np.asarray(loo.score))[0] > 0.7
    np.testing.assert_array_equal(r.n_in, 9)
    np.testing.assert_array_equal(r.n_out, 1)


@pytest.fixture(scope="module")
def digits():
    return jaxmem.load_dataset("digits", limit=240)


def test_result_directory_roundtrip_resume_and_refusal(digits, tmp_path):
    kw = dict(
        model="mlp_vae", model_options={"hidden": [32], "latent_dim": 4}, folds=3,
        batch_size=32, num_samples=8, full_model=True, track_epochs=[1, 2], progress=False,
    )
    out = tmp_path / "run"
    r = jaxmem.memorization(digits.x, digits.y, epochs=2, out_dir=out, **kw)
    n = len(digits.x)
    assert r.ll.shape == (3, n) and r.keep.shape == (3, n)
    assert r.logp_full.shape == (n,) and np.isfinite(r.logp_full).all()
    assert r.M_by_epoch.shape == (2, n)
    np.testing.assert_allclose(r.M_by_epoch[-1], r.M, atol=1e-5)  # epoch 2 is the end
    assert r.leverage is not None and abs(r.leverage.sum() - np.linalg.matrix_rank(
        np.c_[np.ones(n), digits.x.reshape(n, -1)])) < 1e-2
    assert r.history["train_loss"].shape == (2, 3)
    # fold ids: each example's out-model is the one of its fold
    assert (~r.keep[r.fold, np.arange(n)]).all()
    for name in ("config.json", "scores.csv", "result.npz"):
        assert (out / name).exists()
    header = (out / "scores.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["index", "label", "fold", "U", "V", "M"]

    back = jaxmem.load_result(out)
    np.testing.assert_array_equal(back.M, r.M)
    np.testing.assert_array_equal(back.keep, r.keep)
    assert back.config == r.config

    # Rerunning with more epochs resumes (training continues from epoch 2) and keeps
    # the scores tracked before.
    r3 = jaxmem.memorization(digits.x, digits.y, epochs=3, out_dir=out, **kw)
    assert r3.history["train_loss"].shape == (3, 3)
    np.testing.assert_array_equal(r3.history["train_loss"][:2], r.history["train_loss"])
    np.testing.assert_array_equal(r3.tracked_epochs, [1, 2])
    # Fewer epochs than the checkpoints hold would score the 3-epoch members as 2-epoch ones.
    with pytest.raises(jaxmem.ConfigMismatchError, match="trained for 3 epochs"):
        jaxmem.memorization(digits.x, digits.y, epochs=2, out_dir=out, **kw)
    # Other data of the same shape, asking for more epochs: the checkpoints refuse it (they
    # fingerprint the data), and the directory's configuration stays that of its run.
    before = (out / "config.json").read_text()
    with pytest.raises(jaxmem.ConfigMismatchError, match="data"):
        jaxmem.memorization(1 - digits.x, digits.y, epochs=4, out_dir=out, **kw)
    assert (out / "config.json").read_text() == before

    with pytest.raises(jaxmem.ConfigMismatchError, match="model.hidden"):
        jaxmem.memorization(
            digits.x, digits.y, epochs=2, out_dir=out,
            **{**kw, "model_options": {"hidden": [16], "latent_dim": 4}},
        )
    # Scoring with bf16 matmuls is another configuration of this directory...
    assert r3.config["scoring"]["matmul_dtype"] == "float32"
    with pytest.raises(jaxmem.ConfigMismatchError, match="scoring.matmul_dtype: stored 'float32', asked 'bfloat16'"):
        jaxmem.memorization(digits.x, digits.y, epochs=3, out_dir=out, matmul_dtype="bfloat16", **kw)
    # ...and a directory written before the option existed holds a float32 run.
    stored = json.loads((out / "config.json").read_text())
    del stored["scoring"]["matmul_dtype"]
    (out / "config.json").write_text(json.dumps(stored))
    again = jaxmem.memorization(digits.x, digits.y, epochs=3, out_dir=out, **kw)
    np.testing.assert_array_equal(again.M, r3.M)
    # The same training scored with bf16 matmuls (no directory): the rounding moves M by
    # little next to M's spread over the examples (measured: at most 0.023 nats; sd of M
    # 2.0 nats; we allow 0.1).
    low = jaxmem.memorization(digits.x, digits.y, epochs=3, matmul_dtype="bfloat16",
                              **{**kw, "track_epochs": []})
    assert low.config["scoring"]["matmul_dtype"] == "bfloat16"
    assert 0 < np.abs(low.M - r3.M).max() < 0.1, np.abs(low.M - r3.M).max()
    # the report says how log p was computed
    from jaxmem.report import _run_description

    assert any(line.endswith("samples, bf16 matmuls (float32 accumulation)") for line in _run_description(low.config))
    assert not any("bf16" in line for line in _run_description(r3.config))


def test_classifier_gives_label_memorization(digits, tmp_path):
    r = jaxmem.memorization(
        digits.x, digits.y, model="classifier", model_options={"hidden": [32]},
        plan=jaxmem.balanced_subsets(len(digits.x), 8, seed=1), epochs=3,
        batch_size=32, progress=False, linear_baseline=False,
    )
    lm = r.label_memorization
    assert lm.shape == (len(digits.x),) and np.all(np.abs(lm) <= 1)
    assert np.all(r.U <= 0) and np.all(r.V <= 0)  # log p(y|x) is a log-probability
    # scores.csv has it too (read back exactly: 9 significant digits of float32)
    import csv

    r.save(tmp_path)
    with open(tmp_path / "scores.csv") as f:
        np.testing.assert_array_equal([np.float32(row["label_memorization"]) for row in csv.DictReader(f)], lm)


def test_bad_inputs(digits):
    x = digits.x.copy()
    x[7, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="example 7"):
        jaxmem.memorization(x, progress=False)
    with pytest.raises(ValueError, match="labels"):
        jaxmem.memorization(digits.x, model="classifier", progress=False)
    with pytest.raises(ValueError, match=r"y must have shape"):
        jaxmem.memorization(digits.x, digits.y[:5], progress=False)
    with pytest.raises(ValueError, match="k"):
        jaxmem.memorization(digits.x[:3], folds=10, progress=False)
    with pytest.raises(ValueError, match=r"matmul_dtype must be one of"):
        jaxmem.memorization(digits.x, matmul_dtype="float8", progress=False)
    with pytest.raises(ValueError, match=r"track_epochs \[5\] lie outside the epochs 1..3"):
        jaxmem.memorization(digits.x, epochs=3, track_epochs=[2, 5], progress=False)


def test_out_of_range_data_is_refused_before_training(digits, tmp_path):
    """Values a model has no likelihood for fail fast, naming the example and the range.

    Without the check they give silently wrong scores (a Bernoulli draw with p > 1 is
    always 1, conv_vae clips to [0, 1], float labels truncate), after the whole training.
    """
    out = tmp_path / "run"
    kw = dict(epochs=1, progress=False, out_dir=out)
    x255 = digits.x * 255.0
    msg = r"in \[0, 1\], but example 0 has 79.6875 \(x spans \[0, 255\]; divide 8-bit images by 255"
    with pytest.raises(ValueError, match=msg):
        jaxmem.memorization(x255, **kw)
    binary = np.round(digits.x)
    binary[4, 0, 0, 0] = 0.5
    with pytest.raises(ValueError, match="binarize='none'.*must be 0 or 1, but example 4 has 0.5"):
        jaxmem.memorization(binary, model_options={"binarize": "none"}, **kw)
    colour = np.repeat(digits.x, 3, axis=-1)
    colour[9, 1, 1, 2] = -0.25
    with pytest.raises(ValueError, match="conv_vae.*example 9 has -0.25"):
        jaxmem.memorization(colour, model="conv_vae", **kw)
    y = digits.y.copy()
    y[11] = 10
    with pytest.raises(ValueError, match=r"label 10 of example 11 lies outside \[0, 10\)"):
        jaxmem.memorization(digits.x, y, model="classifier", **kw)
    with pytest.raises(ValueError, match="whole-number labels, but example 0 has label 0.5"):
        jaxmem.memorization(digits.x, digits.y + 0.5, model="classifier", **kw)
    with pytest.raises(ValueError, match="x has no examples"):
        jaxmem.memorization(digits.x[:0], **kw)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        jaxmem.memorization(digits.x, **(kw | {"epochs": 0}))
    assert not out.exists()  # refused before anything was written or trained
    # whole-number float labels (a CSV column) are accepted as int32; linear-Gaussian data are unbounded
    cfg = jaxmem.model_config("classifier", digits.x.shape[1:])
    labels = jaxmem.models.check_data(cfg, digits.x, digits.y.astype(np.float64))
    assert labels.dtype == np.int32 and np.array_equal(labels, digits.y)
    lg = jaxmem.model_config("linear_gaussian_vae", (3,), latent_dim=1)
    assert jaxmem.models.check_data(lg, np.array([[-300.0, 2.0, 1e6]])) is None


def test_options_are_checked_before_anything_is_trained_or_written(digits, tmp_path):
    """Every option of memorization() is checked up front: one found bad only when the
    scores are computed would cost the whole training (and, with out_dir, leave a
    directory whose stored configuration no correct rerun could match)."""
    out = tmp_path / "run"
    x, y = digits.x[:60], digits.y[:60]
    kw = dict(epochs=1, progress=False, out_dir=out)
    cases = [
        (dict(quantile=1.5), r"quantile must be .*\[0, 1\], got 1.5"),
        (dict(num_samples=8.0), "num_samples must be an integer.*got 8.0"),
        (dict(track_epochs=[1], track_samples=-2), "track_samples must be an integer >= 1, got -2"),
        (dict(track_epochs=[1.5]), "track_epochs entries must be an integer.*got 1.5"),
        (dict(learning_rate=-1.0), "learning_rate must be a positive finite number, got -1.0"),
        (dict(learning_rate=float("nan")), "learning_rate must be a positive finite number, got nan"),
        (dict(seed=-1), "seed must be .*got -1"),
        (dict(seed=1.5), "seed must be .*integer.*got 1.5"),
        (dict(batch_size=2.5), "batch_size must be an integer.*got 2.5"),
        (dict(epochs=1.5), r"epochs must be an integer >= 1, got 1.5"),
        (dict(checkpoint_every=0), "checkpoint_every must be an integer >= 1, got 0"),
        (dict(plan=jaxmem.kfold(60, 3).keep), "plan must be a jaxmem Plan .*got ndarray"),
        (dict(mesh="x"), "mesh must be None or a jax.sharding.Mesh"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            jaxmem.memorization(x, y, **(kw | options))
    for labels, message in [(np.array(["a"] * 60), "y must hold integer labels, got dtype <U1"),
                            (np.linspace(0, 2, 60), "y must hold whole-number labels, but example 1 has label"),
                            (np.full(60, 2.0**40), "label 1099511627776.0 of example 0 does not fit in int32")]:
        with pytest.raises(ValueError, match=message):
            jaxmem.memorization(x, labels, **kw)
    assert not out.exists()
    # a results directory whose config.json is damaged is named, not a JSON traceback
    out.mkdir()
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json cannot be read as JSON"):
        jaxmem.memorization(x, y, **kw)
    (out / "config.json").write_bytes(b"\xff\xfe{")  # not UTF-8: was a raw UnicodeDecodeError
    with pytest.raises(ValueError, match="config.json cannot be read as JSON"):
        jaxmem.memorization(x, y, **kw)
    (out / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json holds a JSON list, not the run's configuration"):
        jaxmem.memorization(x, y, **kw)
    # a file, or a folder of someone else's files, is not taken as out_dir (results would
    # overwrite scores.csv, summary.md...)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        jaxmem.memorization(x, y, **(kw | {"out_dir": tmp_path / "afile"}))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.md").write_text("my notes")
    with pytest.raises(ValueError, match=r"holds files that are not a jaxmem run \(summary.md\)"):
        jaxmem.memorization(x, y, **(kw | {"out_dir": mine}))
    assert (mine / "summary.md").read_text() == "my notes"
    # A configuration with nothing behind it (a run that failed before its first
    # checkpoint, e.g. diverged) does not block the corrected rerun: it is replaced.
    stale = json.loads(json.dumps({"format": 1, "training": {"learning_rate": 1e38}}))
    (out / "config.json").write_text(json.dumps(stale))
    small = dict(folds=2, num_samples=2, model_options={"hidden": [8]}, batch_size=16, linear_baseline=False)
    r = jaxmem.memorization(x, y, **kw, **small)
    assert json.loads((out / "config.json").read_text())["training"]["learning_rate"] == 1e-3
    assert r.M.shape == (60,)


def test_damaged_results_are_refused_by_name(digits, tmp_path):
    out = tmp_path / "run"
    jaxmem.memorization(digits.x[:60], epochs=1, folds=2, num_samples=2, model_options={"hidden": [8]}, batch_size=16,
                        progress=False, out_dir=out, linear_baseline=False)
    good = dict(np.load(out / "result.npz"))
    assert jaxmem.load_result(out).M.shape == (60,)
    for change, message in [(lambda a: a.pop("M"), r"lacks \['M'\]"),
                            (lambda a: a.pop("threshold"), r"lacks \['threshold'\]"),
                            (lambda a: a.update(M=a["M"][:5]), r"damaged: .*M \(5,\)")]:
        arrays = dict(good)
        change(arrays)
        np.savez(out / "result.npz", **arrays)
        with pytest.raises(ValueError, match=message):
            jaxmem.load_result(out)
    np.savez(out / "result.npz", **good)
    (out / "config.json").unlink()
    with pytest.raises(ValueError, match="holds result.npz but no config.json"):
        jaxmem.load_result(out)
    # a damaged tracked.npz is named on resume, not numpy's pickle message
    out2 = tmp_path / "tracked"
    kw = dict(epochs=1, folds=2, num_samples=2, model_options={"hidden": [8]}, batch_size=16, progress=False,
              out_dir=out2, linear_baseline=False, track_epochs=[1], track_samples=1)
    jaxmem.memorization(digits.x[:60], **kw)
    (out2 / "tracked.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="tracked.npz is damaged"):
        jaxmem.memorization(digits.x[:60], **kw)


def _result(n, rng, **fields):
    """A MemorizationResult of n examples with image-scale log p (~ -3e4 nats), no training."""
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    U = f32(rng.normal(-3e4, 50, n))
    V = f32(U - rng.exponential(1.0, n))
    keep = jaxmem.kfold(n, 2, seed=0).keep
    base = dict(U=U, V=V, M=U - V, stderr=f32(rng.random(n)), dof=f32(rng.random(n) * 10),
                n_in=np.ones(n, np.int32), n_out=np.ones(n, np.int32), highly_memorized=rng.random(n) > 0.9,
                threshold=1.0, ll=np.zeros(keep.shape, np.float32), keep=keep, fold=np.zeros(n, np.int32),
                labels=np.arange(n, dtype=np.int32), logp_full=f32(U + rng.normal(0, 1, n)), leverage=None,
                label_memorization=None, tracked_epochs=np.zeros(0, np.int32),
                M_by_epoch=np.zeros((0, n), np.float32), history={}, config={})
    return jaxmem.MemorizationResult(**(base | fields))


def test_scores_csv_reads_back_exactly_and_has_label_memorization(tmp_path):
    """scores.csv holds every per-example score, each reading back as the array's own value:
    6 significant digits lost up to 0.05 nats at log p ~ -3e4 (float32 spacing 0.002)."""
    import csv

    rng = np.random.default_rng(0)
    n = 50
    lev64 = rng.random(n) / 7  # a float64 array is written with all of its digits
    r = _result(n, rng, leverage=lev64, label_memorization=np.asarray(rng.random(n) - 0.5, np.float32))
    r.save(tmp_path / "clf")
    with open(tmp_path / "clf" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    header = next(csv.reader(open(tmp_path / "clf" / "scores.csv")))
    old = ["index", "label", "fold", "U", "V", "M", "stderr", "n_in", "n_out", "highly_memorized", "logp_full",
           "leverage"]
    assert header == old + ["label_memorization"]  # appended: older readers keep their positions
    for name in ("U", "V", "M", "stderr", "logp_full", "label_memorization"):
        back = np.array([np.float32(row[name]) for row in rows])
        np.testing.assert_array_equal(back, getattr(r, name), err_msg=name)  # exact: float32 -> text -> float32
    np.testing.assert_array_equal([float(row["leverage"]) for row in rows], lev64)  # exact float64
    assert [int(row["highly_memorized"]) for row in rows] == r.highly_memorized.astype(int).tolist()
    # a VAE's result has no label memorization (nor leverage here): empty cells, as logp_full when absent
    _result(n, rng).save(tmp_path / "vae")
    with open(tmp_path / "vae" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(row["label_memorization"] == "" and row["leverage"] == "" for row in rows)


def test_track_epochs_already_trained_are_said_and_not_claimed(digits, tmp_path):
    """A rerun cannot score epochs trained before it (fit restores the newest checkpoint and
    replays nothing): it says so, and the result and config.json list only the epochs scored.
    Before, they were dropped silently while config.json listed them. The last epoch, when it
    is the restored one, is scored from the final state."""
    out = tmp_path / "run"
    # track_samples != num_samples: the last epoch's tracked score is not the final one
    # (shapes and options of the tests above, so that their compiled programs are reused)
    kw = dict(folds=2, num_samples=2, track_samples=1, model_options={"hidden": [8]}, batch_size=16,
              progress=False, linear_baseline=False)
    x = digits.x[:60]
    jaxmem.memorization(x, epochs=2, out_dir=out, **kw)
    with pytest.warns(UserWarning, match=r"track_epochs \[1\] are not scored: .* already trained for 2 epochs"):
        r = jaxmem.memorization(x, epochs=2, out_dir=out, track_epochs=[1, 2], **kw)
    np.testing.assert_array_equal(r.tracked_epochs, [2])
    assert json.loads((out / "config.json").read_text())["scoring"]["track_epochs"] == [2]
    # epoch 2 from the restored final state = what a run from scratch scores in its callback
    fresh = jaxmem.memorization(x, epochs=2, track_epochs=[2], **kw)
    np.testing.assert_array_equal(r.M_by_epoch, fresh.M_by_epoch)  # the same state and key: bitwise
    with pytest.warns(UserWarning, match=r"track_epochs \[1\] are not scored"):
        r = jaxmem.memorization(x, epochs=3, out_dir=out, track_epochs=[1, 2, 3], **kw)
    np.testing.assert_array_equal(r.tracked_epochs, [2, 3])  # 2 kept from the run before
    assert json.loads((out / "config.json").read_text())["scoring"]["track_epochs"] == [2, 3]
    assert jaxmem.load_result(out).config["scoring"]["track_epochs"] == [2, 3]


def test_full_model_leaves_the_plans_models_as_they_are(digits):
    """The full model (all 60 examples, 4 batches of 16) takes the plan members' number of
    steps (2: 30 examples each), so the members train and score exactly as without it.
    Before, every member trained 4 steps per epoch when it was added (M moved by ~0.1 nats)."""
    kw = dict(folds=2, num_samples=2, model_options={"hidden": [8]}, batch_size=16, epochs=2,
              progress=False, linear_baseline=False)
    x = digits.x[:60]
    a = jaxmem.memorization(x, **kw)
    b = jaxmem.memorization(x, full_model=True, **kw)
    assert a.logp_full is None and b.logp_full.shape == (60,) and np.isfinite(b.logp_full).all()
    # same seeds, schedules and member chunks: bitwise
    np.testing.assert_array_equal(b.ll, a.ll)
    np.testing.assert_array_equal(b.M, a.M)
    np.testing.assert_array_equal(b.history["train_loss"], a.history["train_loss"])


# Settings of the tests above (60 digits, 2 folds, an 8-unit VAE), so that their compiled
# programs are reused.
SMALL = dict(folds=2, num_samples=2, model_options={"hidden": [8]}, batch_size=16, progress=False,
             linear_baseline=False)


def _stop_at(epoch):
    def on_epoch(e):
        if e == epoch:
            raise KeyboardInterrupt  # what Ctrl-C in `jaxmem run` does
    return on_epoch


def test_stopped_rerun_keeps_the_result_on_disk_as_it_was_computed(digits, tmp_path, monkeypatch):
    """A rerun with more epochs stopped half way leaves the earlier result with its own
    configuration (before, config.json said 4 epochs beside a 2-epoch result, and load_result
    and `jaxmem report` called it a 4-epoch result); a save stopped between its files is
    refused by load_result, not read as one result."""
    import jaxmem.pipeline as pipeline

    x, out = digits.x[:60], tmp_path / "run"
    r2 = jaxmem.memorization(x, epochs=2, out_dir=out, **SMALL)
    config = (out / "config.json").read_text()
    with pytest.raises(KeyboardInterrupt):
        jaxmem.memorization(x, epochs=4, out_dir=out, on_epoch=_stop_at(3), **SMALL)
    back = jaxmem.load_result(out)
    assert back.config == r2.config and back.config["training"]["epochs"] == 2
    assert back.history["train_loss"].shape == (2, 2)
    np.testing.assert_array_equal(back.M, r2.M)
    assert (out / "config.json").read_text() == config
    assert json.loads((out / "run.json").read_text())["training"]["epochs"] == 4  # the run under way
    # The run under way is still checked: other options are refused, and change nothing.
    with pytest.raises(jaxmem.ConfigMismatchError, match="scoring.num_samples: stored 2, asked 3"):
        jaxmem.memorization(x, epochs=4, out_dir=out, **(SMALL | {"num_samples": 3}))

    # Stopped while saving: config.json and scores.csv of the 4-epoch result are written,
    # result.npz (written last) is still the 2-epoch one.
    real = pipeline._atomic_npz

    def stopped(path, arrays):
        if path.endswith("result.npz"):
            raise KeyboardInterrupt
        real(path, arrays)

    monkeypatch.setattr(pipeline, "_atomic_npz", stopped)
    with pytest.raises(KeyboardInterrupt):
        jaxmem.memorization(x, epochs=4, out_dir=out, **SMALL)
    monkeypatch.setattr(pipeline, "_atomic_npz", real)
    with pytest.raises(ValueError, match="config.json and scores.csv do not belong to its result.npz"):
        jaxmem.load_result(out)
    r4 = jaxmem.memorization(x, epochs=4, out_dir=out, **SMALL)  # scored again from the checkpoints
    back = jaxmem.load_result(out)
    assert back.config == r4.config and back.config["training"]["epochs"] == 4
    np.testing.assert_array_equal(back.M, r4.M)
    assert not (out / "run.json").exists()  # config.json states the run now
    # scores.csv alone replaced (by another result) is refused too
    other = tmp_path / "other"
    r2.save(other)
    (out / "scores.csv").write_bytes((other / "scores.csv").read_bytes())
    with pytest.raises(ValueError, match=r"run: scores.csv does not belong to its result.npz"):
        jaxmem.load_result(out)

    # A directory written by an older jaxmem in that state (config.json of the stopped
    # 4-epoch rerun, result.npz of 2 epochs, which did not carry its configuration)
    old = dict(np.load(other / "result.npz"))
    del old["config_json"], old["scores_csv_sha256"]
    np.savez(other / "result.npz", **old)
    assert jaxmem.load_result(other).config == r2.config  # older results still load
    (other / "config.json").write_text(json.dumps(r4.config))
    with pytest.raises(ValueError, match="config.json describes a run of 4 epochs but result.npz holds the result "
                                         "of 2 .*run it again with the same options to finish it"):
        jaxmem.load_result(other)


def test_run_stopped_before_its_first_checkpoint_is_replaced(digits, tmp_path):
    """A run stopped before its first checkpoint leaves nothing to resume: another
    configuration replaces it (both its config files and its tracked scores). Before, the
    pipeline took the new configuration and rewrote config.json, and then the checkpoints'
    config.json refused it ("refusing to resume from it"), leaving config.json changed."""
    x, out = digits.x[:60], tmp_path / "run"
    tracked = dict(track_epochs=[1], track_samples=1)
    with pytest.raises(KeyboardInterrupt):
        jaxmem.memorization(x, epochs=2, out_dir=out, checkpoint_every=10, on_epoch=_stop_at(1), **tracked,
                            **SMALL)
    assert (out / "tracked.npz").exists() and not (out / "checkpoints" / "checkpoints" / "1").exists()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # A rerun that a later check refuses (here the checkpoints' damaged config.json, read
    # after the results directory's checks) leaves every file as it was.
    ck_config = out / "checkpoints" / "config.json"
    ck_config.write_text("{damaged")
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        jaxmem.memorization(x, epochs=2, out_dir=out, seed=1, **SMALL)
    ck_config.write_bytes(files[ck_config])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files

    r = jaxmem.memorization(x, epochs=2, out_dir=out, seed=1, **SMALL)
    assert r.config["training"]["seed"] == 1 and r.tracked_epochs.size == 0  # no scores of the seed-0 run
    assert json.loads((out / "config.json").read_text())["training"]["seed"] == 1
    assert json.loads(ck_config.read_text())["seed"] == 1
    assert not (out / "tracked.npz").exists()


def test_stop_while_scoring_a_tracked_epoch_is_scored_on_rerun(digits, tmp_path, monkeypatch):
    """A stop in the tracked pass of epoch 2 (after checkpoint 2 was started) used to lose
    that epoch for good: the rerun restored checkpoint 2 and called the epoch "trained
    without scoring". The rerun now scores it from that checkpoint: bit for bit the
    uninterrupted run's (same state, same key, same programs)."""
    import jaxmem.pipeline as pipeline

    x = digits.x[:60]
    kw = dict(epochs=3, track_epochs=[2, 3], track_samples=1, **SMALL)
    ref = jaxmem.memorization(x, **kw)
    real = pipeline.loglik_matrix

    def stopped(*args, **options):
        if options.get("num_samples") == 1:  # the tracked pass (the final one has 2 samples)
            raise KeyboardInterrupt
        return real(*args, **options)

    monkeypatch.setattr(pipeline, "loglik_matrix", stopped)
    with pytest.raises(KeyboardInterrupt):
        jaxmem.memorization(x, out_dir=tmp_path / "run", **kw)
    monkeypatch.setattr(pipeline, "loglik_matrix", real)
    assert jaxmem.checkpoint.latest_epoch(tmp_path / "run" / "checkpoints") == 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not scored" warning
        warnings.filterwarnings("ignore", message="the plan scores")  # 2 folds x 1 repeat: NaN stderr
        r = jaxmem.memorization(x, out_dir=tmp_path / "run", **kw)
    np.testing.assert_array_equal(r.tracked_epochs, [2, 3])
    np.testing.assert_array_equal(r.M_by_epoch, ref.M_by_epoch)
    np.testing.assert_array_equal(r.ll, ref.ll)
    np.testing.assert_array_equal(r.history["train_loss"], ref.history["train_loss"])
    assert r.config["scoring"]["track_epochs"] == [2, 3]


def test_resume_on_another_number_of_training_devices_is_refused(digits, tmp_path):
    """Training's rounding depends on how many devices the members are split over, so the
    count is recorded and a resume on another is refused, naming it (before, it was taken
    silently and the scores matched neither layout)."""
    from jaxmem.ensemble import default_mesh

    x, out = digits.x[:60], tmp_path / "run"
    # the default: the ensemble's own mesh for the members (2 devices for 2 members of 8)
    r = jaxmem.memorization(x, epochs=1, out_dir=out, **SMALL)
    assert r.config["training"]["devices"] == default_mesh(2).size == 2
    config = (out / "config.json").read_text()
    with pytest.raises(jaxmem.ConfigMismatchError,
                       match=r"training.devices: stored 2, asked 1 \(the devices training ran on: pass "
                             r"mesh=jaxmem.make_mesh\(2\), or --devices 2 to `jaxmem run`\)"):
        jaxmem.memorization(x, epochs=2, out_dir=out, mesh=jaxmem.make_mesh(1), **SMALL)
    assert (out / "config.json").read_text() == config and not (out / "run.json").exists()
    # a directory written before the count was recorded: how many it trained on is unknown
    stored = json.loads(config)
    del stored["training"]["devices"]
    (out / "config.json").write_text(json.dumps(stored))
    with pytest.raises(jaxmem.ConfigMismatchError, match=r"training.devices: not recorded, asked 2\). It was "
                                                         "written before jaxmem recorded training.devices"):
        jaxmem.memorization(x, epochs=2, out_dir=out, **SMALL)


def test_multi_process_run_is_refused_before_training(monkeypatch, tmp_path):
    """Under jax.distributed, memorization() trained every epoch in process 0 and only then
    failed at scoring (process 1 failed at once with JAX's device_put error): refused before
    anything is trained or written, naming the multi-process route (simulated: the process
    count is what the check reads)."""
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    epochs = []
    x = np.random.default_rng(0).uniform(size=(12, 4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"runs within one process, and this is process 0 of 2 .*"
                                         r"loglik_matrix_multihost"):
        jaxmem.memorization(x, model="mlp_vae", folds=2, epochs=1, out_dir=tmp_path / "out", on_epoch=epochs.append,
                            progress=False)
    assert epochs == [] and not (tmp_path / "out").exists()


def test_second_run_in_a_directory_in_use_is_refused(digits, tmp_path):
    """A second memorization() in the out_dir of a run still in progress (another terminal,
    another job, another thread) used to read its half-written files and replace or extend
    them under the first; it is refused, naming the holder, before it writes anything, and
    the first run ends as it would alone. A run refused after taking a new out_dir leaves
    no folder behind."""
    import threading

    x, out = digits.x[:60], tmp_path / "run"
    refused = []

    def second_run(epoch):
        if epoch == 1:
            before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
            t = threading.Thread(target=lambda: refused.append(
                pytest.raises(jaxmem.RunDirectoryBusyError, jaxmem.memorization, x, epochs=3, out_dir=out, **SMALL)))
            t.start()
            t.join()
            assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before

    r = jaxmem.memorization(x, epochs=2, out_dir=out, on_epoch=second_run, **SMALL)
    assert len(refused) == 1
    assert str(refused[0].value).startswith(f"out_dir {out} is in use by another run (pid ")
    assert r.config["training"]["epochs"] == 2 and not (out / ".jaxmem-lock").exists()
    np.testing.assert_array_equal(jaxmem.load_result(out).M, r.M)
    # From Python, save() and write_report() into a directory a run holds are refused too
    # (they took no lock: a report or save in a notebook replaced a running run's files),
    # and work in the thread that holds it (memorization saves inside its own hold).
    from jaxmem.report import write_report

    def late_writers(epoch):
        if epoch == 1:
            before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "run2").iterdir())
            for write in (r.save, lambda d: write_report(r, d)):
                t = threading.Thread(target=lambda: refused.append(
                    pytest.raises(jaxmem.RunDirectoryBusyError, write, tmp_path / "run2")))
                t.start()
                t.join()
            assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "run2").iterdir()) == before
            write_report(r, tmp_path / "run2" / "inner")  # a new folder inside: not held

    jaxmem.memorization(x, epochs=2, out_dir=tmp_path / "run2", on_epoch=late_writers, **SMALL)
    assert len(refused) == 3 and all("is in use by another run" in str(e.value) for e in refused[1:])
    # refused once the folder is held (the model is built there): no folder is left
    with pytest.raises(ValueError, match="channels must name at least one convolution"):
        jaxmem.memorization(x, model="conv_vae", model_options={"channels": []}, epochs=1, folds=2,
                            out_dir=tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_preprocess_draws_average_the_loglik_over_binarizations(digits):
    """With dynamic binarization each example is scored as one random binarization of it
    (shared by all members): M's spread over draws is not in the jackknife stderr.
    preprocess_draws=B averages each ll[m, i] over B draws; checked against B separate
    loglik_matrix calls (their mean, then memorization_scores) on the same trained states."""
    x = digits.x[:60]
    kw = {**SMALL, "num_samples": 4}
    r1 = jaxmem.memorization(x, epochs=1, **kw)
    r3 = jaxmem.memorization(x, epochs=1, preprocess_draws=3, **kw)
    assert r3.config["scoring"]["preprocess_draws"] == 3 and r1.config["scoring"]["preprocess_draws"] == 1
    # the same training; the reference ll from the three draws' keys
    fitted = jaxmem.ensemble.fit(lambda s: jaxmem.models.from_config(r1.config["model"], seed=s),
                                 optax.adam(1e-3), x, r1.keep, epochs=1, batch_size=16, seed=0, progress=False)
    graphdef = fitted.graphdef
    # the documented keys: draw 0 fold_in(root, 0x5C0), draw d fold_in(fold_in(root, 2**32 - 2), d)
    root = jax.random.key(0)
    others = jax.random.fold_in(root, 2**32 - 2)
    draws = [np.asarray(jaxmem.loglik_matrix(graphdef, fitted.state, x, key=k, num_samples=4), np.float64)
             for k in (jax.random.fold_in(root, 0x5C0), jax.random.fold_in(others, 1), jax.random.fold_in(others, 2))]
    np.testing.assert_array_equal(r1.ll, draws[0].astype(np.float32))  # the first draw is the single draw's
    # float32 rounding of a mean of three float64 values of ~-40 nats: 1e-5 relative
    np.testing.assert_allclose(r3.ll, np.mean(draws, axis=0), rtol=1e-5)
    ref = jaxmem.memorization_scores(np.mean(draws, axis=0).astype(np.float32), r1.keep)
    np.testing.assert_allclose(r3.M, ref.M, atol=1e-4)
    assert np.abs(r3.M - r1.M).max() > 0.05  # the draws differ: averaging them moved M
    with pytest.raises(ValueError, match=r"preprocess_draws=2 averages over draws .* and mlp_vae with "
                                         r"\{'binarize': 'none'\} draws none"):
        jaxmem.memorization(x, epochs=1, preprocess_draws=2, **{**kw, "model_options": {"binarize": "none"}})


def test_out_dir_paths_that_are_not_a_folder_yet(digits, tmp_path, monkeypatch):
    """An empty out_dir (an unset shell variable) trained, wrote checkpoints/ into the
    working directory and crashed after the first epoch; a symlink to a folder not made
    yet gave 'File exists'; '~' made a folder named '~'. A float32 label of 2**31 passed
    the int32 check (float32(2**31 - 1) is 2**31) and was stored as -2**31."""
    x = digits.x[:40]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="out_dir is an empty path"):
        jaxmem.memorization(x, epochs=1, out_dir="", **SMALL)
    (tmp_path / "link").symlink_to(tmp_path / "scratch" / "results")
    with pytest.raises(ValueError, match=r"out_dir .*link is a symbolic link to .*scratch/results, which does not "):
        jaxmem.memorization(x, epochs=1, out_dir=tmp_path / "link", **SMALL)
    assert sorted(os.listdir(tmp_path)) == ["link"]
    y = np.arange(40, dtype=np.float32) % 2
    y[3] = 2.0**31
    with pytest.raises(ValueError, match="label 2147483648.0 of example 3 does not fit in int32"):
        jaxmem.memorization(x, y, epochs=1, **SMALL)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    r = jaxmem.memorization(x, epochs=1, out_dir="~/run", **SMALL)
    assert (tmp_path / "home" / "run" / "result.npz").is_file() and r.M.shape == (40,)
    # every path argument reads "~" alike (load_result("~/run") said it held no result)
    np.testing.assert_array_equal(jaxmem.load_result("~/run").M, r.M)
    plan = jaxmem.membership.kfold(40, 2, seed=0)
    plan.save("~/plan.npz")
    np.testing.assert_array_equal(jaxmem.membership.load_plan("~/plan.npz").keep, plan.keep)
    np.save(tmp_path / "home" / "x.npy", x)
    assert jaxmem.load_dataset("~/x.npy").x.shape == x.shape
    np.save(tmp_path / "home" / "t.npy", x.reshape(40, -1))
    assert jaxmem.data.read_table("~/t.npy")[0].shape == (40, x[0].size)
    from jaxmem import checkpoint

    monkeypatch.chdir(tmp_path)
    assert checkpoint.latest_epoch("~/run/checkpoints") == 1  # was None, silently
    checkpoint.check_x64("~/run/checkpoints")
    with jaxmem.run_lock("~/locked"):  # made a folder named "~" in the working directory
        assert (tmp_path / "home" / "locked").is_dir()
    jaxmem.report.plot_score_distribution(r.M, "~/figs/m.png")
    assert (tmp_path / "home" / "figs" / "m.png").is_file()
    assert not (tmp_path / "~").exists()


def test_a_plan_that_leaves_the_stderr_undefined_is_warned_of_before_training(digits):
    """The Python default (10 folds x 1 repeat) holds each example out of one model: every
    stderr and dof came back NaN without a word. It is warned of, before training, with
    the counts; 2 models on each side give every example a finite stderr, silently."""
    import warnings

    x = digits.x[:60]

    class Stop(Exception):
        pass

    def stop(epoch):
        raise Stop

    with pytest.warns(UserWarning, match=r"^the plan scores 60 of 60 examples by a single held-out model: "
                                         r"their stderr and dof will be NaN"):
        with pytest.raises(Stop):  # warned before the first epoch ends
            jaxmem.memorization(x, epochs=1, progress=False, on_epoch=stop, model_options={"hidden": [8]},
                                linear_baseline=False, num_samples=2)
    with warnings.catch_warnings():  # not before a refusal of the options
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="track_epochs"):
            jaxmem.memorization(x, epochs=1, track_epochs=[2], progress=False)
    kw = {**SMALL, "folds": 2}
    with pytest.warns(UserWarning, match=r"60 of 60 examples by a single held-out model and 60 of 60 "
                                         r"examples by a single training model"):
        r = jaxmem.memorization(x, epochs=1, **kw)
    assert np.isnan(r.stderr).all() and (r.n_out == 1).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = jaxmem.memorization(x, epochs=1, repeats=2, **kw)
    assert np.isfinite(r.stderr).all() and (r.n_out == 2).all() and (r.n_in == 2).all()


def test_resume_on_more_devices_than_there_are_says_how_to_get_them(digits, tmp_path):
    """A run trained on more devices than this process has: the refusal says what decided
    the count and how to get more (here conftest's XLA_FLAGS; in a plain Python session on
    a CPU, jaxmem.use_cpu_devices(N) right after the imports: test_mesh). Before, it
    advised make_mesh(N) alone, which then failed with 'N but K device(s) are available'."""
    x, out = digits.x[:60], tmp_path / "run"
    jaxmem.memorization(x, epochs=1, out_dir=out, **SMALL)
    stored = json.loads((out / "config.json").read_text())
    stored["training"]["devices"] = 9  # conftest forces 8 CPU devices
    (out / "config.json").write_text(json.dumps(stored))
    with pytest.raises(jaxmem.ConfigMismatchError,
                       match=r"pass mesh=jaxmem.make_mesh\(9\), or --devices 9 to `jaxmem run`; make_mesh\(9\) needs 9 "
                             r"devices and XLA_FLAGS=--xla_force_host_platform_device_count=8 gives JAX 8 CPU "
                             r"device\(s\) .*unset XLA_FLAGS, or set its count to 9"):
        jaxmem.memorization(x, epochs=2, out_dir=out, **SMALL)


def test_provenance_is_recorded_and_a_resume_under_other_versions_says_so(digits, tmp_path):
    """Training's rounding depends on the jax/jaxlib/flax/optax versions (jax 0.10.2 and
    0.11.2 moved the default run's M by 0.07-0.09 nats RMS), so the result records them; a
    run resumed under other versions is not refused (provenance is not compared) but
    warned of, and its result records this session's versions and the earlier session's.
    Before, nothing was recorded and such a resume was silent."""
    from jaxmem.checkpoint import provenance

    x, out = digits.x[:60], tmp_path / "run"
    r = jaxmem.memorization(x, epochs=1, out_dir=out, **SMALL)
    now = provenance()
    assert r.config["provenance"] == now and now["jax"] == jax.__version__
    assert jaxmem.load_result(out).config["provenance"] == now  # config.json and result.npz
    # As if the first session had run another jax: the results' and the checkpoints' record.
    older = {**now, "jax": "0.0.1"}
    paths = [out / "config.json", out / "checkpoints" / "config.json",
             *(out / "checkpoints" / "checkpoints").glob("*/config/metadata")]
    for path in paths:
        path.write_text(json.dumps({**json.loads(path.read_text()), "provenance": older}))
    with pytest.warns(UserWarning, match=rf"jax 0\.0\.1 -> {jax.__version__}\).*matches neither version"):
        r2 = jaxmem.memorization(x, epochs=2, out_dir=out, **SMALL)
    assert r2.config["provenance"] == {**now, "earlier": [older]}
    assert jaxmem.load_result(out).config["provenance"] == {**now, "earlier": [older]}
    assert r2.history["train_loss"].shape[0] == 2  # resumed, not refused
    # A directory written before provenance was recorded resumes too.
    for path in paths:
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "provenance"}))
    r3 = jaxmem.memorization(x, epochs=3, out_dir=out, **SMALL)
    assert r3.config["provenance"] == now


def test_x64_mismatch_is_refused_before_the_run_says_it_resumes(digits, tmp_path):
    """A run trained with jax_enable_x64 on, resumed with it off, is refused before
    on_stage("train") (where `jaxmem run` prints "resuming from the checkpoint"), and the
    message names the setting and how to resume (before: after that line, with
    'Differences:; jax_enable_x64: stored true vs now "<missing>"' and 'use a new run
    directory')."""
    x, out = digits.x[:60], tmp_path / "run"
    jaxmem.memorization(x, epochs=1, out_dir=out, **SMALL)
    ckpt_config = out / "checkpoints" / "config.json"
    ckpt_config.write_text(json.dumps({**json.loads(ckpt_config.read_text()), "jax_enable_x64": True}))
    stages = []
    with pytest.raises(jaxmem.ConfigMismatchError, match=r"trained with jax_enable_x64 on and this process has it "
                                                         r"off .*JAX_ENABLE_X64=1.*jax.config.update"):
        jaxmem.memorization(x, epochs=2, out_dir=out, on_stage=stages.append, **SMALL)
    assert stages == []


def test_scoring_keys_are_streams_no_member_or_example_has():
    """The scoring key fold_in(key(seed), 0x5C0) was member 1472's key in plans of 1473 or
    more models (Feldman & Zhang runs thousands), and draw d of preprocess_draws was scored
    from fold_in(score_key, d), example d's own key: draws shared random numbers with the
    examples. Neither key is now any member's or example's; runs of up to 1472 models keep
    the scoring key of every earlier run."""
    from jaxmem.pipeline import _score_keys

    data = lambda k: tuple(np.asarray(jax.random.key_data(k)).tolist())  # noqa: E731
    root = jax.random.key(7)
    members = {data(jax.random.fold_in(root, m)) for m in range(1500)}
    small, small_draws = _score_keys(7, 1472, 4)
    assert data(small) == data(jax.random.fold_in(root, 0x5C0))  # unchanged for every run so far
    big, big_draws = _score_keys(7, 1473, 4)
    assert data(big) not in members and data(small_draws[0]) == data(small)
    for score, draws in ((small, small_draws), (big, big_draws)):
        examples = {data(jax.random.fold_in(score, i)) for i in range(64)}
        assert len({data(k) for k in draws}) == 4
        assert not {data(k) for k in draws[1:]} & (examples | members)
    assert [data(k) for k in small_draws[1:]] == [data(k) for k in big_draws[1:]]


def test_seeds_from_2_to_the_32_are_refused():
    """JAX keys take 32 bits of a seed with x64 off (64 with it on): seeds 0 and 2**32 drew
    the same members, batches and samples (bit-identical ll under one plan), and 2**63
    crashed with a bare OverflowError. Refused, naming the bound."""
    x = np.zeros((8, 4, 4), np.float32)
    for seed in (2**32, 2**40 + 7, 2**63):
        with pytest.raises(ValueError, match=rf"seed must be below 2\*\*32, got {seed}: JAX keys take 32 bits"):
            jaxmem.memorization(x, epochs=1, seed=seed, progress=False)
        with pytest.raises(ValueError, match=r"seed must be below 2\*\*32"):
            jaxmem.ensemble.member_init_seed(seed, 0)
    assert jaxmem.ensemble.member_init_seed(2**32 - 1, 0) >= 0


def _full_disk_after(nbytes):
    """A stand-in for np.savez that writes ``nbytes`` of its file, then fails as a full disk does."""
    import errno

    def savez(file, **arrays):  # noqa: ARG001
        f = open(file, "wb") if isinstance(file, (str, os.PathLike)) else file
        f.write(b"\0" * nbytes)
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    return savez


def test_a_save_into_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """result.npz written as far as the disk allows: the half-written temporary is removed
    (it holds the space a retry needs), the error names result.npz, and the result saved
    there before is kept whole."""
    import errno

    rng = np.random.default_rng(0)
    first = _result(20, rng)
    first.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    monkeypatch.setattr(np, "savez", _full_disk_after(1000))
    with pytest.raises(OSError) as info:
        _result(20, rng).save(tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "result.npz")
    assert isinstance(info.value.__cause__, OSError)  # the original, with no file name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no *.tmp* left
    assert (tmp_path / "result.npz").read_bytes() == before["result.npz"]
    monkeypatch.undo()
    # config.json and scores.csv of the second result were written: they do not match
    # the first result.npz, and are refused as such (never read as one result).
    with pytest.raises(ValueError, match="scores.csv does not belong to its result.npz"):
        jaxmem.load_result(tmp_path)
