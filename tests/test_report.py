"""Tests of jaxmem.report: summary numbers by hand, Spearman vs scipy, every figure."""

import types

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from jaxmem import report
from jaxmem.data import load_dataset
from jaxmem.report import (
    figure3_bins,
    spearman_correlation,
    summary,
    summary_markdown,
)


def _synthetic(n=1000, seed=0):
    """M a permutation of 0..n-1, logp = 0..n-1, so every number is known by hand.

    With n = 1000 the 0.95 quantile of M is 949.05 (linear interpolation at
    0.95 * 999), so the 50 examples with M >= 950 are highly memorized. The central
    90% of logp is [49.95, 949.05]: positions 50..949. We put 30 of the 50 highly
    memorized examples there and 20 in the tails: the share is 30/50 = 0.6.
    """
    rng = np.random.default_rng(seed)
    logp = np.arange(n, dtype=np.float64)
    high_pos = np.r_[rng.choice(np.arange(50, 950), 30, replace=False),
                     rng.choice(np.r_[0:50, 950:1000], 20, replace=False)]
    rest = np.setdiff1d(np.arange(n), high_pos)
    M = np.empty(n)
    M[high_pos] = rng.permutation(np.arange(950, 1000))
    M[rest] = rng.permutation(np.arange(950))
    return M, logp, high_pos


def test_summary_numbers_by_hand():
    M, logp, high_pos = _synthetic()
    s = summary(M, logp=logp, in_counts=np.full(1000, 90), out_counts=np.r_[np.full(999, 10), 9])
    # Linear-interpolation quantiles of 0..999: q * 999.
    expected = {"0.5": 499.5, "0.9": 899.1, "0.95": 949.05, "0.99": 989.01,
                "0.995": 994.005, "0.999": 998.001}
    assert s["quantiles"].keys() == expected.keys()
    for q, v in expected.items():
        assert s["quantiles"][q] == pytest.approx(v, abs=1e-9)
    assert s["threshold"] == pytest.approx(949.05)
    assert s["num_highly_memorized"] == 50
    assert s["central_90_logp"] == pytest.approx([49.95, 949.05])
    assert s["share_highly_memorized_in_central_90"] == pytest.approx(0.6)
    assert s["mean"] == pytest.approx(499.5) and s["max"] == 999.0
    assert s["in_counts"] == {"min": 90, "median": 90.0, "max": 90}
    assert s["out_counts"] == {"min": 9, "median": 10.0, "max": 10}
    assert s["spearman_leverage"] is None
    md = summary_markdown(s)
    assert "| M | 499.500 | 899.100 | 949.050 | 989.010 | 994.005 | 998.001 |" in md
    assert "60.0% (more than half, as in the paper)" in md
    assert "50 examples" in md and "min 9, median 10, max 10" in md


def test_summary_with_given_mask_and_leverage():
    M, logp, high_pos = _synthetic()
    mask = np.zeros(1000, bool)
    mask[high_pos[20:]] = True  # the 20 tail examples only and 10 central ones
    s = summary(M, logp=logp, leverage=M * 2 + 1, highly_memorized=mask)
    assert s["num_highly_memorized"] == 30
    assert s["share_highly_memorized_in_central_90"] == pytest.approx(10 / 30)
    assert s["spearman_leverage"] == pytest.approx(1.0)  # leverage monotone in M
    assert "not more than half" in summary_markdown(s)


def test_summary_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"M contains NaN or inf at 1 example\(s\); the first is example 3"):
        summary(np.array([0.0, 1, 2, np.nan, 4]))
    with pytest.raises(ValueError, match="logp has 2 values, expected 3"):
        summary(np.zeros(3), logp=np.zeros(2))
    with pytest.raises(ValueError, match="must be 1-D"):
        summary(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"highly_memorized must be a bool array of shape \[3\]"):
        summary(np.zeros(3), highly_memorized=np.zeros(3, int))
    # Model counts are whole numbers >= 0 (3.0 is fine, 2.7 and -1 are not).
    assert summary(np.zeros(3), in_counts=np.array([3.0, 4, 5]))["in_counts"] == {
        "min": 3, "median": 4.0, "max": 5}
    with pytest.raises(ValueError, match=r"in_counts must be whole numbers >= 0 .* 3 are not; "
                                         r"the first is example 0 \(2.7\)"):
        summary(np.zeros(3), in_counts=np.full(3, 2.7))
    with pytest.raises(ValueError, match=r"out_counts must be whole numbers >= 0 .* example 1 \(-1.0\)"):
        summary(np.zeros(3), out_counts=np.array([1, -1, 2]))
    with pytest.raises(ValueError, match="in_counts has 2 values, expected 3"):
        summary(np.zeros(3), in_counts=np.ones(2, int))
    # The quantile is checked also when the flags are given.
    with pytest.raises(ValueError, match=r"quantile must be a real number in \[0, 1\], got 1.5"):
        summary(np.zeros(3), quantile=1.5, highly_memorized=np.zeros(3, bool))


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = np.round(rng.normal(size=500), 1)  # many ties
    b = np.round(a + rng.normal(size=500), 0)
    # Same formula on ranks in float64: agreement to rounding.
    assert spearman_correlation(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-12)
    np.testing.assert_array_equal(report._ranks(b), scipy.stats.rankdata(b))
    assert spearman_correlation(a, -a) == pytest.approx(-1.0)
    assert np.isnan(spearman_correlation(a, np.ones(500)))


def test_figure3_bins_counts():
    logp = np.array([0.0, 0.5, 1.0, 2.5, 3.0, 4.0])
    high = np.array([False, True, False, True, True, False])
    edges, n_high, n_regular = figure3_bins(logp, high, bins=4)  # width 1 on [0, 4]
    np.testing.assert_allclose(edges, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(n_high, [1, 0, 1, 1])  # 0.5 | - | 2.5 | 3.0
    np.testing.assert_array_equal(n_regular, [1, 1, 0, 1])  # 0.0 | 1.0 | - | 4.0


def _check_png(path, min_size=(500, 300)):
    assert path.exists() and path.stat().st_size > 10_000
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        # Not a blank canvas: a real plot has many distinct colours.
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 20


def test_every_figure_writes_a_png(tmp_path):
    M, logp, _ = _synthetic()
    rng = np.random.default_rng(1)
    leverage = rng.beta(2, 30, 1000)
    _check_png(report.plot_score_distribution(M, tmp_path / "dist.png"))
    _check_png(report.plot_figure3(logp, M > np.quantile(M, 0.95), tmp_path / "fig3.png"))
    _check_png(report.plot_memorization_vs_leverage(M, leverage, tmp_path / "lev.png"))
    epochs = np.arange(1, 6)
    _check_png(report.plot_scores_over_epochs(
        epochs, M[None] * epochs[:, None] / 5, tmp_path / "sub" / "epochs.png"))
    resid = rng.standard_t(4, 1000)
    _check_png(report.plot_influence(leverage, resid, resid**2 * leverage,
                                     tmp_path / "infl.png", num_params=10))


def test_examples_grid_and_its_errors(tmp_path):
    digits = load_dataset("digits", limit=200)
    M = np.linspace(0, 3, 200)
    path = report.plot_examples_grid(digits.x, M, digits.x, tmp_path / "grid.png",
                                     per_group=2, neighbours=3)
    _check_png(path, min_size=(400, 400))
    with pytest.raises(ValueError, match="exclude_self needs images to be the training images"):
        report.plot_examples_grid(digits.x[:10], M[:10], digits.x, tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"images must be \[n, height, width"):
        report.plot_examples_grid(np.zeros((20, 4)), np.zeros(20), np.zeros((20, 4)),
                                  tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"1, 3 or 4 channels, got shape \(20, 4, 4, 2\)"):
        report.plot_examples_grid(np.zeros((20, 4, 4, 2)), np.zeros(20), np.zeros((20, 4, 4, 2)),
                                  tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"M_by_epoch must be \[3 epochs, n\]"):
        report.plot_scores_over_epochs([1, 2, 3], np.zeros((2, 5)), tmp_path / "e.png")


def test_run_description_names_the_optimizer():
    config = {"training": {"epochs": 3, "learning_rate": 0.001, "optimizer": "adam"}}
    assert any("Adam lr 0.001" in line for line in report._run_description(config))
    # A custom optax transformation (e.g. a schedule) ignores learning_rate: not "Adam lr".
    config["training"]["optimizer"] = "custom"
    lines = report._run_description(config)
    assert not any("Adam" in line for line in lines)
    assert any("custom optimizer" in line for line in lines)


def _fake_result(n=30, quantile=0.95, example_shape=(8, 8, 1)):
    """The fields write_report reads, with M = 0..n-1 and M above ``quantile`` flagged."""
    M = np.arange(n, dtype=np.float32)
    return types.SimpleNamespace(
        M=M, U=-M, n_in=np.full(n, 2), n_out=np.ones(n, int),
        highly_memorized=M > np.quantile(M, quantile), leverage=None, tracked_epochs=None,
        config={"data": {"n": n, "example_shape": list(example_shape)},
                "scoring": {"quantile": quantile}},
    )


def test_write_report_refuses_a_dataset_it_cannot_show(tmp_path):
    x = load_dataset("digits", limit=6).x  # [6, 8, 8, 1]
    result = _fake_result(n=6)
    for bad, match in [
        (x[:4], r"dataset must be \[6, height, width\] or \[6, height, width, channels\] .* "
                r"got shape \(4, 8, 8, 1\)"),
        (x.reshape(6, 64), r"got shape \(6, 64\) \(reshape flat examples"),
        (x[..., None, None], r"got shape \(6, 8, 8, 1, 1, 1\)"),
        (np.zeros((6, 5, 5)), r"dataset holds examples of shape \(5, 5\) but the result scored "
                               r"examples of shape \(8, 8, 1\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            report.write_report(result, tmp_path / "out", dataset=bad)
        assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="result must be a MemorizationResult .*this dict has no M, U"):
        report.write_report({"M": np.zeros(6)}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The same examples as [n, H, W] (or a Dataset) are drawn.
    files = report.write_report(result, tmp_path / "ok", dataset=x[..., 0])["files"]
    assert "examples" in files and files["examples"].exists()


@pytest.mark.parametrize("quantile, num_high", [(0.0, 29), (1.0, 0)])
def test_write_report_at_the_ends_of_the_quantile_range(tmp_path, quantile, num_high):
    # memorization(quantile=0 or 1) is accepted by the scores: the report shows it too.
    out = report.write_report(_fake_result(quantile=quantile), tmp_path)
    assert out["summary"]["num_highly_memorized"] == num_high
    assert f"{num_high} examples" in out["markdown"]
    for kind in ("distribution", "figure3"):
        _check_png(out["files"][kind])
    with pytest.raises(ValueError, match=r"quantile must be a real number in \[0, 1\], got 1.5"):
        bad = _fake_result()
        bad.config["scoring"]["quantile"] = 1.5
        report.write_report(bad, tmp_path / "bad")


def test_write_report_checks_label_memorization_and_writes_strict_json(tmp_path):
    import json

    def strict(text):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"not JSON: {c}")))

    for bad, match in [(np.zeros(3), r"label_memorization has 3 values, expected 30"),
                       (np.where(np.arange(30) == 4, np.nan, 0.0), r"label_memorization contains NaN or inf .* "
                                                                    r"the first is example 4")]:
        result = _fake_result()
        result.label_memorization = bad
        with pytest.raises(ValueError, match=match):
            report.write_report(result, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()  # refused before anything was written
    # A constant leverage has no rank correlation (NaN): summary.json says null, strictly.
    result = _fake_result()
    result.leverage = np.full(30, 0.1)
    result.label_memorization = np.linspace(-1, 1, 30)
    out = report.write_report(result, tmp_path / "ok")
    assert np.isnan(out["summary"]["spearman_leverage"])
    written = strict(out["files"]["summary_json"].read_text())
    assert written["spearman_leverage"] is None
    assert written["label_memorization"]["max"] == 1.0 and written["label_memorization"]["num_above_0.5"] == 8
    with pytest.raises(ValueError, match="not JSON: NaN"):
        strict('{"a": NaN}')


def test_examples_grid_draws_at_most_the_neighbours_a_small_pool_has(tmp_path):
    x = load_dataset("digits", limit=5).x
    # 5 images, each left out of its own neighbours: 4 neighbours per row instead of 5.
    files = report.write_report(_fake_result(n=5), tmp_path / "r5", dataset=x)["files"]
    _check_png(files["examples"], min_size=(300, 300))
    assert files["summary"].is_file()
    # 2 images (the fewest a run has): one neighbour each.
    _check_png(report.plot_examples_grid(x[:2], np.arange(2.0), x[:2], tmp_path / "two.png"), (200, 200))
    with pytest.raises(ValueError, match=r"a pool of 1 image\(s\) leaves no neighbour to show"):
        report.plot_examples_grid(x[:1], np.zeros(1), x[:1], tmp_path / "one.png")
    assert report._drawable_shape((8, 8)) and report._drawable_shape((8, 8, 3))
    assert not report._drawable_shape((8, 8, 2)) and not report._drawable_shape((64,))


def test_write_report_deletes_its_own_files_it_did_not_write_this_time(tmp_path):
    x = load_dataset("digits", limit=6).x
    result = _fake_result(n=6)
    result.leverage = np.linspace(0.01, 0.5, 6)
    first = report.write_report(result, tmp_path, dataset=x)["files"]
    assert {"examples", "leverage"} <= set(first)
    (tmp_path / "notes.txt").write_text("mine")  # not a report file: left alone
    (tmp_path / "influence.png").write_bytes(b"")
    result.leverage = None
    second = report.write_report(result, tmp_path)  # no images, no leverage this time
    assert set(second["files"]) == {"distribution", "figure3", "summary", "summary_json"}
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["figure3_logp.png", "influence.png", "memorization_distribution.png"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert all(f"`{p.name}`" in second["markdown"] for p in second["files"].values() if p.suffix == ".png")


def test_run_description_says_what_was_run():
    config = {"data": {"name": "digits", "binarize": "static"},
              "model": {"name": "mlp_vae", "binarize": "none", "hidden": [8]},
              "plan": {"kind": "kfold", "k": 2, "repeats": 1, "num_models": 2},
              "training": {"full_model": True}, "scoring": {"num_samples": 7}}
    lines = report._run_description(config)
    assert "- model: mlp_vae (binarize=static, hidden=[8])" in lines  # drawn when loading
    assert "- plan: 2 folds x 1 repeat(s), 2 models + 1 full model trained on every example" in lines
    assert "- log p: importance-weighted with 7 samples" in lines
    config["data"]["binarize"], config["training"]["full_model"] = None, False
    config["model"] = {"name": "classifier", "num_classes": 10}
    lines = report._run_description(config)
    assert "- log p(y|x): exact (classifier)" in lines and "- plan: 2 folds x 1 repeat(s), 2 models" in lines
    assert not any("importance" in line or "binarize" in line for line in lines)
    assert not any("software" in line for line in lines)  # results written before provenance
    # the versions that set training's rounding, and those of earlier sessions of a resumed run
    now = {"python": "3.12.3", "jax": "0.11.2", "jaxlib": "0.11.2", "flax": "0.12.12", "optax": "0.2.8",
           "platform": "gpu", "device_kind": "NVIDIA H200"}
    config["provenance"] = {**now, "earlier": [{**now, "jax": "0.10.2", "device_kind": "cpu"}]}
    assert report._run_description(config)[-1] == (
        "- software: jax 0.11.2 (jaxlib 0.11.2), flax 0.12.12, optax 0.2.8, Python 3.12.3, on NVIDIA H200; "
        "resumed from sessions under jax 0.10.2")


def _drawn_figures(monkeypatch):
    """{file name: Figure} of every figure saved while the returned dict is in use."""
    from matplotlib.figure import Figure

    figures, save = {}, Figure.savefig

    def record(fig, path, *args, **kwargs):
        name = str(getattr(path, "name", path)).rsplit("/", 1)[-1]  # (a file: the figure's temporary)
        figures[name.removesuffix(".tmp")] = fig
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def test_a_classifier_report_names_log_p_of_y_given_x_and_is_not_compared_with_the_paper(tmp_path, monkeypatch):
    figures = _drawn_figures(monkeypatch)
    result = _fake_result(n=40)  # 2 of 40 highly memorized, both inside the central 90% of U
    result.U = -np.abs(result.M - 20.0)
    result.config["model"] = {"name": "classifier", "num_classes": 10}
    out = report.write_report(result, tmp_path / "cls")
    fig3 = figures["figure3_logp.png"]
    assert [ax.get_xlabel() for ax in fig3.axes] == ["log p(y|x) under models trained on (x, y), U (nats)"] * 2
    assert "log p(y|x)" in fig3.axes[0].get_title() and "log p(y|x)" in fig3.get_suptitle()
    line = next(line for line in out["markdown"].splitlines() if "central 90%" in line)
    assert "central 90% of log p(y|x) (" in line and line.endswith("nats): 100.0%"), line  # no verdict
    assert "paper" not in out["markdown"] and "more than half" not in out["markdown"]
    # A density model keeps log p(x) and the paper's comparison.
    result.config["model"] = {"name": "mlp_vae"}
    out = report.write_report(result, tmp_path / "vae")
    assert figures["figure3_logp.png"].axes[0].get_xlabel() == "log p(x) under models trained on x, U (nats)"
    assert "central 90% of log p ([" in out["markdown"]
    assert "100.0% (more than half, as in the paper)" in out["markdown"]
    M, logp, _ = _synthetic()
    s = summary(M, logp=logp)
    assert summary_markdown(s, conditional=True) == summary_markdown(s).replace(
        " (more than half, as in the paper)", "").replace("of log p (", "of log p(y|x) (")


def test_the_epochs_legend_covers_no_line(tmp_path, monkeypatch):
    figures = _drawn_figures(monkeypatch)
    epochs = np.arange(1, 6)
    # The 5 most memorized examples are high from the first epoch on, where an upper-left
    # legend would sit.
    M = np.r_[np.linspace(0, 1, 95), np.full(5, 10.0)]
    report.plot_scores_over_epochs(epochs, np.tile(M, (5, 1)), tmp_path / "epochs.png")
    fig = figures["epochs.png"]
    fig.canvas.draw()  # at the figure's own dpi
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    box, legend = ax.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(box), (legend, box)  # beside the axes: over no line or band
    assert fig.bbox.contains(legend.x1 - 1, legend.y0 + 1)  # and inside the saved figure


def test_write_report_keeps_the_grid_of_these_scores_when_asked(tmp_path):
    x = load_dataset("digits", limit=6).x
    result = _fake_result(n=6)
    grid = report.write_report(result, tmp_path, dataset=x)["files"]["examples"]
    drawn = grid.read_bytes()
    # The images cannot be loaded again (`jaxmem report` of TFDS data without --data-dir):
    # the grid drawn from these very scores stays, listed as kept, not as written.
    out = report.write_report(result, tmp_path, keep_examples=True)
    assert out["kept"] == {"examples": grid} and "examples" not in out["files"]
    assert grid.read_bytes() == drawn
    assert f"- `{grid.name}` (kept from an earlier report of these scores)" in out["markdown"]
    out = report.write_report(result, tmp_path, keep_examples=True)  # and again
    assert out["kept"] == {"examples": grid} and grid.read_bytes() == drawn
    # A grid of other scores (the result changed since, e.g. more epochs) is deleted all the same.
    result.M = result.M[::-1].copy()
    out = report.write_report(result, tmp_path, keep_examples=True)
    assert out["kept"] == {} and not grid.exists() and grid.name not in out["markdown"]


def test_influence_plot_labels_points_with_the_given_index(tmp_path, monkeypatch):
    # The CLI leaves out h = 1 rows and passes the rows it kept: the labels must name
    # those rows, not positions in the filtered arrays.
    import matplotlib.axes

    texts = []
    orig = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: texts.append(text) or orig(self, text, *a, **k))
    h, t = np.array([0.1, 0.2, 0.3]), np.array([1.0, -3.0, 0.5])
    d = np.array([0.1, 0.9, 0.3])
    report.plot_influence(h, t, d, tmp_path / "a.png", label_top=2, index=np.array([0, 5, 7]))
    assert texts == ["#5", "#7"]
    texts.clear()
    report.plot_influence(h, t, d, tmp_path / "b.png", label_top=1)  # default: positions
    assert texts == ["#1"]
    with pytest.raises(ValueError, match="index must be"):
        report.plot_influence(h, t, d, tmp_path / "c.png", index=[0, 1])


def test_a_report_into_a_full_disk_keeps_the_earlier_figures_whole(tmp_path, monkeypatch):
    """A figure that fails part-way (a full disk) leaves the earlier report's PNG of that
    name as it was and no temporary file, and the error names the figure."""
    import errno
    import os

    from matplotlib.figure import Figure

    result = _fake_result()
    report.write_report(result, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = Figure.savefig

    def savefig(self, fname, **kwargs):
        if "figure3" in os.fspath(getattr(fname, "name", fname)):
            f = fname if hasattr(fname, "write") else open(fname, "wb")  # (a path: in place)
            f.write(b"\x89PNG" + b"\0" * 1000)  # as far as the disk allows
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fname, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(OSError) as info:
        report.write_report(result, tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "figure3_logp.png")
    assert sorted(before) == sorted(p.name for p in tmp_path.iterdir())  # no *.tmp left
    assert (tmp_path / "figure3_logp.png").read_bytes() == before["figure3_logp.png"]
    _check_png(tmp_path / "figure3_logp.png")
