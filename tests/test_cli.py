"""The `jaxmem` command, run as a subprocess: results directory, resume, refusals, errors.

Every run uses tiny settings (150 digits, 2 folds, a 16-unit VAE, 4 importance
samples) so that a run costs seconds; the numbers are checked against the files the
run wrote (M = U - V row by row) and, for `jaxmem leverage`, against a float64 numpy
hat matrix.
"""

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from jaxmem import cli

# One CPU device: the subprocesses compile for it once (persistent cache from conftest).
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.3"}
TINY = ["--limit", "150", "--folds", "2", "--repeats", "1", "--hidden", "16", "--latent", "2", "--samples", "4",
        "--batch-size", "32", "--track-samples", "4", "--checkpoint-every", "1", "--no-progress"]
EPOCHS = 30  # enough epochs (each checkpointed) to kill a run in the middle of training
RUN = ["run", *TINY, "--epochs", str(EPOCHS), "--track-epochs", "10,30"]
FIGURES = ("memorization_distribution.png", "figure3_logp.png",
           "examples_nearest_neighbours.png", "memorization_vs_leverage.png",
           "memorization_over_epochs.png")


def jaxmem(*args, cwd=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "jaxmem", *map(str, args)], env=ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "jaxmem", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_one_line_error(returncode, err, *words):
    lines = err.strip().splitlines()
    assert returncode == 2, (returncode, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("jaxmem: error: "), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _latest(out):
    root = out / "checkpoints" / "checkpoints"
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
    return max(steps, default=None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run interrupted (Ctrl-C) after its first checkpoint, then run again to the end.

    Returns ``(results dir, epoch of the last checkpoint before the interruption, the
    completed second process)``.
    """
    out = tmp_path_factory.mktemp("cli") / "results"
    proc = start(*RUN, "--out", out)
    deadline = time.monotonic() + 200
    while _latest(out) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again to resume" in err
    assert "Ctrl-C: stopping after the checkpoint of epoch " in err, err
    assert "Traceback" not in err
    done = _latest(out)
    assert done is not None and 1 <= done < EPOCHS, done
    assert not (out / "result.npz").exists()
    # loading or reporting the stopped run says what it is (was "run `jaxmem run` first")
    from jaxmem.pipeline import load_result

    with pytest.raises(FileNotFoundError, match=f"holds a run stopped after epoch {done}, with no result yet"):
        load_result(out)
    proc = jaxmem(*RUN, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, done, proc


def test_signals_name_themselves_and_the_epoch_they_stop_after(capsys):
    interrupts = cli._Interrupts(checkpoint_every=5, epochs=30)
    interrupts.on_stage("train")
    interrupts.on_epoch(12)
    interrupts._handler(signal.SIGTERM, None)  # a scheduler's: not called Ctrl-C
    err = capsys.readouterr().err
    assert "SIGTERM: stopping after the checkpoint of epoch 15" in err and "send SIGTERM again" in err, err
    interrupts.on_epoch(13)  # training goes on to the checkpoint
    with pytest.raises(KeyboardInterrupt):
        interrupts.on_epoch(15)
    last = cli._Interrupts(checkpoint_every=5, epochs=17)
    last.on_stage("train")
    last.on_epoch(16)
    last._handler(signal.SIGINT, None)
    assert "Ctrl-C: stopping after the checkpoint of epoch 17" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
        last._handler(signal.SIGINT, None)


def test_interrupted_while_reporting_points_at_jaxmem_report(finished, tmp_path, capsys, monkeypatch):
    """Stopped after the result was saved (the report was being written): rerunning the
    command scored everything again; `jaxmem report DIR` finishes the figures."""
    import jaxmem.report

    out = tmp_path / "done"
    shutil.copytree(finished[0], out)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jaxmem.report, "write_report", stop)
    used = json.loads((out / "config.json").read_text())["training"]["devices"]  # this process has 8
    code, _, err = run_main(capsys, *RUN, "--devices", used, "--out", out)
    assert code == 130, err
    assert f"the scores are saved in {out / 'result.npz'}: run `jaxmem report {out}`" in err, err
    # and the rerun itself said that it scores again what report would redraw
    assert f"scoring again (its saved result is replaced; `jaxmem report {out}` redraws" in err, err


def test_interrupted_run_resumes(finished):
    out, done, proc = finished
    resumed_from = int(proc.stderr.split("resuming from the checkpoint of epoch ")[1].split()[0])
    # Ctrl-C lets the pending checkpoint save finish, so the rerun starts from at least
    # the epoch that was on disk when we interrupted: epochs already trained are not redone.
    assert done <= resumed_from < EPOCHS
    with np.load(out / "result.npz") as z:
        # The training history is whole: restored epochs plus the ones trained after.
        assert z["history_train_loss"].shape == (EPOCHS, 2)
        assert np.isfinite(z["history_train_loss"]).all()


def test_run_writes_every_result_file(finished):
    out, _, proc = finished
    for name in ("scores.csv", "result.npz", "config.json", "summary.md", "summary.json", *FIGURES):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = read_csv(out / "scores.csv")
    assert len(rows) == 150
    assert {"index", "label", "U", "V", "M", "stderr", "n_in", "n_out", "fold", "leverage"} <= set(rows[0])
    with np.load(out / "result.npz") as z:
        np.testing.assert_allclose(z["M"], z["U"] - z["V"], rtol=1e-6, atol=1e-4)
        # The CSV reads back the float32 numbers exactly.
        np.testing.assert_array_equal(np.float32([float(r["M"]) for r in rows]), z["M"])
        assert z["M_by_epoch"].shape == (2, 150) and list(z["tracked_epochs"]) == [10, 30]
        assert z["ll"].shape == (2, 150) and np.isfinite(z["ll"]).all()
    assert all((int(r["n_in"]), int(r["n_out"])) == (1, 1) for r in rows)  # 2 folds
    assert [int(r["label"]) for r in rows[:5]] == [0, 1, 2, 3, 4]  # digits' first labels
    summary = (out / "summary.md").read_text()
    assert summary in proc.stdout  # printed and saved
    assert "central 90% of log p" in summary and "Spearman rank correlation of M with leverage" in summary
    assert f"Results in {out}" in proc.stdout
    # A CPU host: one device per core, at most one per model (2 models here).
    from jaxmem.mesh import cpu_cores

    assert f"2 models x {EPOCHS} epochs; {min(cpu_cores(), 2)} CPU device(s)" in proc.stderr


def test_report_regenerates(finished, capsys):
    out = finished[0]
    before = (out / "summary.md").read_text()
    for name in FIGURES:
        (out / name).unlink()
    (out / "summary.md").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert all((out / name).is_file() for name in FIGURES)
    assert (out / "summary.md").read_text() == before
    assert before in capsys.readouterr().out


def test_mismatched_configuration_is_refused(finished):
    out = finished[0]
    config = (out / "config.json").read_text()
    proc = jaxmem(*RUN, "--hidden", "8", "--out", out)
    assert_one_line_error(proc.returncode, proc.stderr, "another configuration", "hidden")
    assert (out / "config.json").read_text() == config
    proc = jaxmem(*RUN, "--matmul-dtype", "bfloat16", "--out", out)  # scored in float32
    assert_one_line_error(proc.returncode, proc.stderr, "another configuration", "scoring.matmul_dtype")
    assert (out / "config.json").read_text() == config


def test_resume_on_another_device_count_is_refused(finished, capsys):
    """The devices training ran on are recorded; another --devices on resume is refused
    before anything is trained, naming --devices and the count the run used (before, it
    resumed silently, and the scores matched neither count's)."""
    import json

    out = finished[0]
    config = (out / "config.json").read_text()
    used = json.loads(config)["training"]["devices"]
    from jaxmem.mesh import cpu_cores

    assert used == min(cpu_cores(), 2)  # the default: one device per core, at most one per model
    other = 1 if used != 1 else 2
    code, _, err = run_main(capsys, *RUN, "--devices", other, "--out", out)  # in this process: 8 devices
    assert_one_line_error(code, err, f"training.devices: stored {used}, asked {other}", f"--devices {used}")
    assert (out / "config.json").read_text() == config and not (out / "run.json").exists()


def test_more_epochs_continue_a_finished_run(finished, tmp_path):
    out = tmp_path / "more"
    shutil.copytree(finished[0], out)  # leave the shared results alone
    # Epoch 20 was trained, not scored, by the first run: said in one jaxmem line, left out.
    proc = jaxmem(*RUN[:-4], "--epochs", EPOCHS + 2, "--track-epochs", "10,20,30,32", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from the checkpoint of epoch {EPOCHS} in" in proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if "track_epochs [20] are not scored" in ln]
    assert len(said) == 1 and said[0].startswith("jaxmem: warning: "), proc.stderr
    assert "UserWarning" not in proc.stderr, proc.stderr
    with np.load(out / "result.npz") as z:
        assert z["history_train_loss"].shape == (EPOCHS + 2, 2)
        assert list(z["tracked_epochs"]) == [10, 30, 32]


def test_bad_inputs_give_one_line_and_no_traceback(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(10, np.float32))
    nan = np.random.default_rng(0).random((40, 4, 4), dtype=np.float32)
    nan[3, 1, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    out = tmp_path / "out"
    cases = {
        "missing": (["--data", tmp_path / "missing.npy"], ["not found", "missing.npy"]),
        "shape": (["--data", tmp_path / "flat.npy"], ["shape (10,)"]),
        "nan": (["--data", tmp_path / "nan.npy"], ["NaN", "example 3"]),
        "unknown": (["--data", "no_such_set"], ["unknown data set", "no_such_set"]),
        "folds": (["--limit", "5", "--folds", "10"], ["--folds 10", "at least 10 examples"]),
    }
    # All at once: each costs mostly the interpreter's start and imports.
    procs = {k: start("run", *args, "--out", out) for k, (args, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert_one_line_error(proc.returncode, err, *cases[name][1])
    assert not (out / "result.npz").exists()


def run_main(capsys, *args):
    """``jaxmem ARGS`` in this process: (exit status, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_shows_defaults_but_not_none(capsys):
    """Options without a default value say what they do; argparse appended a second
    "(default: None)" to --latent's own "(default: 8 for the MLP VAE ...)"."""
    for command in ("run", "report", "leverage"):
        code, out, _ = run_main(capsys, command, "--help")
        assert code == 0 and "(default: None)" not in out, out
    code, out, _ = run_main(capsys, "run", "--help")
    assert "(default: 10)" in out  # --folds: real defaults are still shown


def test_option_errors_in_process(capsys, tmp_path):
    cases = {
        "option": (["run", "--folds", "ten"], ["--folds", "ten"]),
        "quantile": (["run", "--quantile", "1.5"], ["--quantile"]),
        "track": (["run", "--epochs", "3", "--track-epochs", "5"], ["--track-epochs", "exceed"]),
        "hidden": (["run", "--hidden", "0,3"], ["positive"]),
        "hidden_empty_item": (["run", "--hidden", "8,,4"], ["--hidden", "'8,,4'", "empty item"]),
        "seed": (["run", "--seed", "-1"], ["--seed", "non-negative integer", "-1"]),
        "dtype": (["run", "--matmul-dtype", "float16"], ["--matmul-dtype", "float16"]),
        "not_prepared": (["run", "--data", "mnist", "--data-dir", tmp_path / "tfds"],
                         ["not prepared", "tfds build"]),
        "report": (["report", tmp_path / "nowhere"], ["not found"]),
        "corrupt": (["report", tmp_path / "corrupt"], ["corrupt", "result.npz"]),
    }
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "result.npz").write_text("not an archive")
    for name, (args, words) in cases.items():
        code, _, err = run_main(capsys, *args)
        assert_one_line_error(code, err, *words)
    # Training that diverges (a finite but absurd rate: Adam's first steps of 1e30 overflow
    # every member's loss) ends with one error line after the stage lines, no traceback.
    code, _, err = run_main(capsys, "run", "--limit", "40", "--folds", "2", "--epochs", "2", "--hidden", "8",
                            "--latent", "2", "--samples", "4", "--batch-size", "16", "--lr", "1e30",
                            "--no-progress", "--out", tmp_path / "diverged")
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith("jaxmem: error: training diverged in epoch 1") and "holds no checkpoint yet" in last, err
    # the learning rate is part of the directory's configuration: the advice is a new one
    assert f"{tmp_path / 'diverged'} resumes only with learning rate 1e+30" in last, err
    assert "trains from scratch in a new output directory" in last, err


def _table(path, header=True):
    from sklearn.datasets import load_diabetes  # real data shipped with scikit-learn

    d = load_diabetes()
    X, y = d.data[:60, :3], d.target[:60]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["age", "sex", "bmi", "progression"])
        w.writerows(np.c_[X, y].tolist())
    return X, y


def test_leverage_command_matches_numpy(tmp_path, capsys):
    X, y = _table(tmp_path / "diabetes.csv")
    code, stdout, err = run_main(capsys, "leverage", tmp_path / "diabetes.csv", "--target",
                                 "progression", "--out", tmp_path / "lev", "--top", "5")
    assert code == 0, err
    assert "Top 5 rows by Cook's distance" in stdout
    rows = read_csv(tmp_path / "lev" / "leverage.csv")
    got = {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}
    # float64 reference: thin QR of [1, X]; residuals; Cook's distance by its definition.
    A = np.c_[np.ones(len(X)), X]
    Q, _ = np.linalg.qr(A)
    h = (Q**2).sum(1)
    e = y - A @ np.linalg.lstsq(A, y, rcond=None)[0]
    n, p = A.shape
    s2 = e @ e / (n - p)
    cooks = e**2 / (p * s2) * h / (1 - h) ** 2
    # The CSV keeps 8 significant digits.
    np.testing.assert_allclose(got["leverage"], h, rtol=1e-6)
    np.testing.assert_allclose(got["residual"], e, rtol=1e-6, atol=1e-6 * np.abs(e).max())
    np.testing.assert_allclose(got["cooks_distance"], cooks, rtol=1e-6)
    assert (tmp_path / "lev" / "influence.png").is_file()
    top = int(stdout.split("Top 5 rows by Cook's distance:")[1].splitlines()[2].split()[0])
    assert top == int(np.argmax(cooks))


def test_leverage_without_target_and_bad_tables(tmp_path, capsys):
    X, _ = _table(tmp_path / "t.csv", header=False)
    code, _, err = run_main(capsys, "leverage", tmp_path / "t.csv", "--out", tmp_path / "lev")
    assert code == 0, err
    rows = read_csv(tmp_path / "lev" / "leverage.csv")
    # Without a target: leverage of [1, X] with the 3 feature columns and the target column.
    A = np.c_[np.ones(len(X)), np.loadtxt(tmp_path / "t.csv", delimiter=",")]
    Q, _ = np.linalg.qr(A)
    np.testing.assert_allclose([float(r["leverage"]) for r in rows], (Q**2).sum(1), rtol=1e-6)
    assert "loo_log_density_ratio" in rows[0]
    assert (tmp_path / "lev" / "loo_ratio_vs_leverage.png").is_file()

    lines = (tmp_path / "t.csv").read_text().splitlines()
    cells = lines[7].split(",")
    cells[2] = "nan"
    lines[7] = ",".join(cells)
    (tmp_path / "nan.csv").write_text("\n".join(lines) + "\n")
    bad = {
        "nan": (["leverage", tmp_path / "nan.csv"], ["NaN", "row 7", "column 2"]),
        "target": (["leverage", tmp_path / "t.csv", "--target", "weight"], ["--target", "weight"]),
        "missing": (["leverage", tmp_path / "none.csv"], ["not found"]),
        "few_rows": (["leverage", tmp_path / "short.csv", "--target", "3"], ["at least rank + 2 = 6 rows"]),
        # A header name given twice, or a name that is also another column's index.
        "duplicate": (["leverage", tmp_path / "dup.csv", "--target", "a"],
                      ["--target 'a' is ambiguous", "2 columns named 'a'", "columns 0, 2"]),
        "name_or_index": (["leverage", tmp_path / "numeric.csv", "--target", "2"],
                          ["--target '2' is ambiguous", "names column 0", "index of column 'c'"]),
        # a target fitted exactly (constant): its residuals would be rounding noise
        "exact": (["leverage", tmp_path / "const.csv", "--target", "y", "--out", tmp_path / "exact"],
                  ["const.csv: --target 'y'", "fitted exactly", "residual variance 0 up to rounding"]),
        "complex": (["leverage", tmp_path / "complex.npy"], ["complex.npy: the table is complex", "complex128"]),
    }
    (tmp_path / "const.csv").write_text("\n".join(["a,b,y", *(f"{i},{i % 3},5" for i in range(10))]) + "\n")
    np.save(tmp_path / "complex.npy", np.ones((8, 2)) + 1j)
    (tmp_path / "short.csv").write_text("\n".join(lines[:5]) + "\n")
    (tmp_path / "dup.csv").write_text("\n".join(["a,b,a,y", *lines]) + "\n")
    (tmp_path / "numeric.csv").write_text("\n".join(["2,b,c,y", *lines]) + "\n")
    for name, (args, words) in bad.items():
        code, _, err = run_main(capsys, *args)
        assert_one_line_error(code, err, *words)
    assert not (tmp_path / "exact").exists()  # refused before --out was created
    # without a target the same table still gets its leverage
    code, _, err = run_main(capsys, "leverage", tmp_path / "const.csv", "--out", tmp_path / "exact")
    assert code == 0, err
    # constant columns besides a random target: every leverage is 1/n, no rank correlation
    (tmp_path / "flat.csv").write_text("\n".join(["a,y", *(f"1,{np.sin(i)}" for i in range(10))]) + "\n")
    code, stdout, err = run_main(capsys, "leverage", tmp_path / "flat.csv", "--target", "y", "--out", tmp_path / "flat")
    assert code == 0, err
    assert "with leverage: undefined (the LOO density ratio or the leverage is the same" in stdout



def test_leverage_qr_labels_and_undefined_rows(tmp_path, capsys, monkeypatch):
    import matplotlib.axes

    texts = []
    orig = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: texts.append(text) or orig(self, text, *a, **k))
    # A Unix-timestamp column beside the intercept (kappa ~ 2e7): the CLI must use QR and be
    # exact against float64 numpy on the centred design, with no advice it cannot follow.
    rng = np.random.default_rng(0)
    n = 300
    ts = np.round(1.7e9 + rng.uniform(0, 600, n))
    temp = rng.normal(20, 2, n)
    y = 0.01 * (ts - ts.min()) + 0.5 * temp + rng.normal(size=n)
    np.savetxt(tmp_path / "log.csv", np.c_[ts, temp, y], delimiter=",", header="timestamp,temp,y",
               comments="", fmt="%.10f")
    code, _, err = run_main(capsys, "leverage", tmp_path / "log.csv", "--target", "y", "--out", tmp_path / "ts")
    assert code == 0 and "warning" not in err, err
    got = read_csv(tmp_path / "ts" / "leverage.csv")
    A = np.c_[np.ones(n), ts - ts.mean(), temp]
    Q, _ = np.linalg.qr(A)
    h = (Q**2).sum(1)
    e = y - A @ np.linalg.lstsq(A, y, rcond=None)[0]
    cooks = e**2 / (3 * (e @ e) / (n - 3)) * h / (1 - h) ** 2
    # The CSV keeps 8 significant digits (Cholesky was off by 0.009 of max 0.154 here).
    np.testing.assert_allclose([float(r["cooks_distance"]) for r in got], cooks, rtol=1e-6, atol=1e-9)

    # A category seen once (h = 1, row 4): left out of the figure, whose labels must still
    # name rows of leverage.csv (the most influential is row 20).
    a = rng.normal(size=30)
    rare = (np.arange(30) == 4).astype(float)
    yy = a + rng.normal(size=30)
    yy[20] += 8
    np.savetxt(tmp_path / "t.csv", np.c_[a, rare, yy], delimiter=",", header="a,rare,y", comments="", fmt="%.10g")
    texts.clear()
    code, stdout, err = run_main(capsys, "leverage", tmp_path / "t.csv", "--target", "y", "--out", tmp_path / "o")
    assert code == 0, err
    rows = read_csv(tmp_path / "o" / "leverage.csv")
    cook = np.nan_to_num(np.array([float(r["cooks_distance"]) for r in rows]), nan=-1)
    assert texts == [f"#{i}" for i in np.argsort(-cook)[:5]] and texts[0] == "#20", texts
    # Without a target: the same note as with one, and the figure of the other rows.
    np.savetxt(tmp_path / "u.csv", np.c_[a, rare], delimiter=",", header="a,rare", comments="", fmt="%.10g")
    code, stdout, err = run_main(capsys, "leverage", tmp_path / "u.csv", "--out", tmp_path / "u")
    assert code == 0, err
    assert "note: 1 row(s) with leverage 1 have an undefined LOO density ratio (NaN)" in stdout, stdout
    assert (tmp_path / "u" / "loo_ratio_vs_leverage.png").is_file()


def test_mnist_like_data_are_padded_to_32_as_in_the_paper(tmp_path):
    import tensorflow_datasets as tfds

    parser = cli.build_parser()
    with tfds.testing.mock_data(num_examples=4):
        for name in ("mnist", "fashion_mnist", "digits"):
            spec = cli._data_spec(parser.parse_args(["run", "--data", name]))
            # The spec is the run's data configuration (config.json) and what `jaxmem report`
            # reloads the images with: a resume loaded otherwise is refused.
            assert spec["pad_to"] == (None if name == "digits" else 32)
            ds = cli._load(spec, seed=0, data_dir=None)
            assert ds.example_shape == ((8, 8, 1) if name == "digits" else (32, 32, 1))
        raw = np.stack([tfds.data_source("mnist", split="train")[i]["image"] for i in range(4)])
        np.testing.assert_array_equal(cli._load(cli._data_spec(parser.parse_args(["run", "--data", "mnist"])),
                                      seed=0, data_dir=None).x[:, 2:30, 2:30] * 255, raw)
        # A configuration written before pad_to was recorded reloads its unpadded images.
        old = {"source": "mnist", "limit": None, "binarize": None}
        assert cli._load(old, seed=0, data_dir=None).example_shape == (28, 28, 1)


def _run_quietly(*args):
    """``jaxmem ARGS`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """Two runs in this process (1 epoch of 8-unit models, 1 sample per likelihood) of data
    whose example grid used to fail after training: 5 images [5, 8, 8] (fewer than 1 + the
    grid's 5 neighbours), with --full-model --binarize static, and 20 two-channel examples
    [20, 8, 8, 2] with labels, scored by a classifier (on one device). Returns {name: (dir, stderr)}."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    np.save(root / "five.npy", rng.uniform(size=(5, 8, 8)).astype(np.float32))
    np.savez(root / "two_channels.npz", x=rng.uniform(size=(20, 8, 8, 2)).astype(np.float32),
             y=np.arange(20) % 2)
    quick = ["--folds", "2", "--repeats", "1", "--epochs", "1", "--samples", "1", "--hidden", "8",
             "--batch-size", "4", "--track-epochs", "none", "--no-progress"]
    runs = {}
    # "five" on this process's 8 devices (3 models train on 3 of them), the other on one
    for name, data, extra in (("five", "five.npy", ["--full-model", "--binarize", "static"]),
                              ("two_channels", "two_channels.npz", ["--model", "classifier", "--devices", "1"])):
        code, _, err = _run_quietly("run", "--data", root / data, *quick, *extra, "--out", root / name)
        assert code == 0, err
        runs[name] = (root / name, err)
    return runs


def test_report_keeps_a_grid_drawn_for_a_result_saved_from_python(small_runs, tmp_path):
    """memorization(out_dir=...) records no data source; a grid the user drew there with
    write_report(result, DIR, x) was deleted by `jaxmem report DIR`, without a note."""
    import jaxmem

    result = jaxmem.load_result(small_runs["five"][0])
    result.config["data"] = {k: v for k, v in result.config["data"].items() if k != "source"}
    out = tmp_path / "from_python"
    result.save(out)
    x = np.load(small_runs["five"][0].parent / "five.npy")
    jaxmem.write_report(result, out, x)
    grid = out / "examples_nearest_neighbours.png"
    drawn = grid.read_bytes()
    code, _, err = _run_quietly("report", out)
    assert code == 0, err
    assert grid.read_bytes() == drawn
    assert "is kept from the run: the run recorded no data source to reload its images from" in err, err


def test_runs_finish_whatever_the_example_grid_can_show(small_runs):
    for name, grid in (("five", True), ("two_channels", False)):
        out, err = small_runs[name]
        assert (out / "summary.md").is_file() and (out / "summary.json").is_file()
        # 5 images: 4 neighbours each (the example itself left out); [n, H, W] is drawn as grey.
        assert (out / "examples_nearest_neighbours.png").is_file() == grid
        if not grid:  # said before anything is trained
            assert err.index("note: no example grid: examples of shape (8, 8, 2)") < err.index("training")
        code, _, err = _run_quietly("report", out)
        assert code == 0, err
        assert (out / "examples_nearest_neighbours.png").is_file() == grid


def test_run_texts_say_what_was_run(small_runs):
    out, err = small_runs["five"]
    header = err.splitlines()[0]
    assert "binarize=static);" in header, header  # drawn when loading, not "none"
    assert "2 folds x 1 repeat(s) = 2 models + 1 full model = 3 models x 1 epochs" in header
    assert header.endswith("; 8 CPU device(s) (3 for training)"), header  # as many as give 1 model each
    summary = (out / "summary.md").read_text()
    assert "binarize=static," in summary and "2 models + 1 full model trained on every example" in summary
    out, err = small_runs["two_channels"]
    assert "log p(y|x) of 20 examples under every model (exact)" in err and "importance" not in err
    summary = (out / "summary.md").read_text()
    assert "- log p(y|x): exact (classifier)" in summary and "importance" not in summary


def test_conv_vae_warns_about_data_that_are_not_8_bit(tmp_path, capsys):
    # The conv VAE dequantizes as 8-bit pixels; the digits have 17 levels. An --out that is a
    # file stops each run (one error line) after the data are loaded and before any training.
    (tmp_path / "a_file").write_text("")
    np.save(tmp_path / "bytes.npy", np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), np.uint8))
    for data, levels in (("digits", "17 intensity levels"), (tmp_path / "bytes.npy", None)):
        code, _, err = run_main(capsys, "run", "--model", "conv_vae", "--data", data, "--limit", "30",
                                "--out", tmp_path / "a_file")
        lines = err.strip().splitlines()
        assert code == 2 and lines[-1].startswith("jaxmem: error: out_dir") and "is a file" in lines[-1], err
        warnings = [line for line in lines if "warning: conv_vae dequantizes pixels as 8-bit values" in line]
        assert len(warnings) == (1 if levels else 0), err
        if levels:
            assert f"digits has {levels}" in warnings[0]


def test_report_keeps_the_run_grid_when_its_images_cannot_be_reloaded(small_runs, tmp_path):
    run, _ = small_runs["five"]
    out = tmp_path / "five"
    shutil.copytree(run, out)
    grid = out / "examples_nearest_neighbours.png"
    drawn = grid.read_bytes()
    data = run.parent / "five.npy"  # where config.json says the scored images are
    moved = tmp_path / "five.npy"
    shutil.move(data, moved)
    try:
        code, stdout, err = _run_quietly("report", out)
    finally:
        shutil.move(moved, data)
    assert code == 0, err
    assert grid.read_bytes() == drawn  # not deleted, not redrawn
    note = err.strip().splitlines()[-1]
    assert note.startswith("jaxmem: note: examples_nearest_neighbours.png is kept from the run: the images "
                           "could not be reloaded ("), note
    assert note.endswith(f"; to redraw it, put the run's data back at {data} and run `jaxmem report {out}` "
                         "again"), note
    assert "(kept from an earlier report of these scores)" in (out / "summary.md").read_text()
    # With the data back, the grid is drawn again and nothing is noted.
    code, stdout, err = _run_quietly("report", out)
    assert code == 0 and "note" not in err, err
    assert grid.is_file() and "examples_nearest_neighbours.png" in stdout.splitlines()[-1]


def test_report_of_tfds_data_without_data_dir_keeps_the_grid_and_names_data_dir(small_runs, tmp_path):
    import dataclasses

    from jaxmem import load_result, write_report

    # The "five" result as if its 5 images came from TFDS's mnist, which `jaxmem report`
    # cannot find without the run's --data-dir (config.json does not record it).
    run, _ = small_runs["five"]
    result = load_result(run)
    data = {**result.config["data"], "source": "mnist", "limit": 5}
    result = dataclasses.replace(result, config={**result.config, "data": data})
    out = tmp_path / "mnist"
    result.save(out)
    grid = write_report(result, out, dataset=np.load(run.parent / "five.npy"))["files"]["examples"]
    drawn = grid.read_bytes()
    code, _, err = _run_quietly("report", out)
    assert code == 0, err
    assert grid.read_bytes() == drawn
    note = err.strip().splitlines()[-1]
    assert note.startswith("jaxmem: note: examples_nearest_neighbours.png is kept from the run: "), note
    assert note.endswith(f"to redraw it, pass the TFDS data folder the run read: `jaxmem report {out} "
                         "--data-dir FOLDER`"), note


def test_preprocess_draws_reach_the_scores(tmp_path):
    """--preprocess-draws B averages each log-likelihood over B binarizations (the numbers
    are checked in test_pipeline); here: it is recorded, and refused, before training, for
    a model whose preprocessing draws nothing."""
    quick = ["--limit", "40", "--folds", "2", "--repeats", "1", "--epochs", "1", "--samples", "2", "--hidden", "8",
             "--latent", "2", "--batch-size", "16", "--track-epochs", "none", "--no-progress", "--devices", "1"]
    code, _, err = _run_quietly("run", *quick, "--preprocess-draws", "2", "--out", tmp_path / "two")
    assert code == 0, err
    assert json.loads((tmp_path / "two" / "config.json").read_text())["scoring"]["preprocess_draws"] == 2
    assert "averaged over 2 draws of the preprocessing" in (tmp_path / "two" / "summary.md").read_text()
    assert "under every model (2 importance samples, 2 draws of the preprocessing)" in err
    code, _, err = _run_quietly("run", *quick, "--binarize", "static", "--preprocess-draws", "2",
                                "--out", tmp_path / "static")
    assert_one_line_error(code, err, "preprocess_draws=2 averages over draws", "draws none")
    assert not (tmp_path / "static").exists()


def test_report_waits_for_the_run_that_holds_the_folder(small_runs):
    """`jaxmem report DIR` rewrote and deleted figures while a run was still writing DIR;
    it is refused while another process holds the folder, and runs once it is free."""
    out, _ = small_runs["five"]
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom jaxmem.checkpoint import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)", str(out)],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "held"
        code, _, err = _run_quietly("report", out)
        assert_one_line_error(code, err, f"results directory {out} is in use by another run (pid {proc.pid} on ",
                              "wait for it to end (its report is written when it ends)")
        assert "another directory" not in err  # a run's advice, not a report's
    finally:
        proc.kill()
        proc.wait()
    code, _, err = _run_quietly("report", out)
    assert code == 0, err


def test_classifier_labels_far_sparser_than_their_range_are_refused(tmp_path):
    """num_classes is the largest label + 1: ids as labels (0..9 and 2e9) built a softmax of
    2e9 outputs, 127 GiB of parameters per member, an out-of-memory kill."""
    rng = np.random.default_rng(0)
    y = np.arange(20) % 10
    y[5] = 2_000_000_000
    np.savez(tmp_path / "ids.npz", x=rng.uniform(size=(20, 4)).astype(np.float32), y=y)
    code, _, err = _run_quietly("run", "--data", tmp_path / "ids.npz", "--model", "classifier", "--folds", "2",
                                "--epochs", "1", "--no-progress", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "the labels reach 2000000000 but take only 11 distinct values",
                          "np.unique(y, return_inverse=True)[1]")


def test_leverage_names_redundant_columns(tmp_path):
    """A table with the same length in inches and in cm: the rank warning advised
    dtype=jnp.float64 and method='qr' (no options of the command) and named no column."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(size=40)
    y = a + b + rng.normal(size=40)
    np.savetxt(tmp_path / "dup.csv", np.c_[a, b, 2.54 * a, np.full(40, 3.0), y], delimiter=",",
               header="inches,b,cm,constant,y", comments="")
    for extra in (["--target", "y"], []):
        code, out, err = _run_quietly("leverage", tmp_path / "dup.csv", *extra, "--out", tmp_path / "o")
        assert code == 0, err
        assert "column(s) 'inches', 'cm', 'constant' are linear combinations" in err, err
        assert "method='qr'" not in err and "numerical rank" not in err, err
    # the fit is the one without the redundant columns (h and t do not depend on the choice)
    code, _, err = _run_quietly("leverage", tmp_path / "dup.csv", "--target", "y", "--out", tmp_path / "o")
    rows = read_csv(tmp_path / "o" / "leverage.csv")
    np.savetxt(tmp_path / "lean.csv", np.c_[a, b, y], delimiter=",", header="inches,b,y", comments="")
    code, _, err = _run_quietly("leverage", tmp_path / "lean.csv", "--target", "y", "--out", tmp_path / "lean")
    lean = read_csv(tmp_path / "lean" / "leverage.csv")
    for key in ("leverage", "studentized_residual"):
        # 8 significant digits in the CSV
        np.testing.assert_allclose([float(r[key]) for r in rows], [float(r[key]) for r in lean], rtol=1e-6)


def test_leverage_row_need_follows_the_rank(tmp_path):
    """The command asked n >= p + 3 rows (p + 2 without a target) whatever the rank, so a
    small table with a duplicated column was refused though the fit (rank + 2) takes it."""
    from jaxmem import linear

    rng = np.random.default_rng(1)
    a, b, y = rng.normal(size=(3, 5))
    np.savetxt(tmp_path / "small.csv", np.c_[a, b, 2 * a, y], delimiter=",", header="a,b,a2,y", comments="")
    # 5 rows, 3 columns of rank 3 with the intercept: 5 >= 3 + 2 (the old check asked 6)
    code, _, err = _run_quietly("leverage", tmp_path / "small.csv", "--target", "y", "--out", tmp_path / "o")
    assert code == 0, err
    rows = read_csv(tmp_path / "o" / "leverage.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = linear.influence(np.c_[np.ones(5), a, b], y, dtype=np.float64, method="qr")
    for key, ref in (("leverage", want.leverage), ("studentized_residual", want.studentized_external)):
        np.testing.assert_allclose([float(r[key]) for r in rows], np.asarray(ref), rtol=1e-6)  # 8 digits in the CSV
    # one row fewer: refused with the rank's need
    np.savetxt(tmp_path / "four.csv", np.c_[a, b, 2 * a, y][:4], delimiter=",", header="a,b,a2,y", comments="")
    code, _, err = _run_quietly("leverage", tmp_path / "four.csv", "--target", "y", "--out", tmp_path / "o4")
    assert_one_line_error(code, err, "4 rows for 3 column(s) (+ intercept) of rank 3", "at least rank + 2 = 5 rows")
    # without a target a wide table gets its leverage (1 for every row) and a note on the ratio
    code, out, err = _run_quietly("leverage", tmp_path / "four.csv", "--out", tmp_path / "w")
    assert code == 0, err
    assert [float(r["leverage"]) for r in read_csv(tmp_path / "w" / "leverage.csv")] == pytest.approx([1.0] * 4)
    assert "no Gaussian LOO density ratio" in out
    # three rows, three columns: too few rows, not columns that are combinations of others
    np.savetxt(tmp_path / "three.csv", np.c_[a, b, y][:3], delimiter=",", header="a,b,y", comments="")
    code, out, err = _run_quietly("leverage", tmp_path / "three.csv", "--out", tmp_path / "t3")
    assert code == 0, err
    assert "3 row(s) for 3 column(s) + intercept" in err and "every row's leverage is 1" in err, err
    assert "linear combinations" not in err and "warning" not in err, err


def test_redundant_columns_follow_the_fits_rank_cut():
    """The columns named redundant are those whose removal leaves the rank that the fit
    (jaxmem.linear's float64 QR) finds unchanged. A near-dependence (col 4 = spike + e +
    3e-8 a) sits between two equilibrations' cuts: the command's own by-column-maximum
    rank check did not name column a, which the fit's rank treats as redundant."""
    from jaxmem import linear

    rng = np.random.default_rng(0)
    n = 400
    a, spike, e = rng.normal(size=n), np.zeros(n), np.zeros(n)
    spike[0], e[1:3] = 1.0, 1.0
    design = np.c_[np.ones(n), a, spike, e, spike + e + 3e-8 * a]
    y = rng.normal(size=n)

    def rank(d):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return linear.influence(d, y, dtype=np.float64, method="qr").rank

    full = rank(design)
    assert full == 4
    want = [j for j in range(1, design.shape[1]) if rank(np.delete(design, j, axis=1)) == full]
    assert want == [1, 2, 3, 4]
    assert cli._redundant_columns(design) == want


def test_devices_that_xla_flags_overrides_are_refused_naming_it(capsys, tmp_path):
    """--devices N where XLA_FLAGS forces fewer CPU devices (it wins over use_cpu_devices):
    one line naming XLA_FLAGS and the cure, before anything is trained (this process: the 8
    devices conftest forces). Before: 'num_devices=9 but 8 device(s) are available', even
    when following the resume advice '--devices N'."""
    code, _, err = run_main(capsys, *RUN, "--devices", 9, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "--devices 9: this process has 8 device(s)",
                          "XLA_FLAGS=--xla_force_host_platform_device_count=8", "set its count to 9")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_error_lists_after_a_colon_read_as_one_line(capsys):
    """A message whose list follows "...:" on lines of its own (a ConfigMismatchError's
    "Differences:") reads "...: a; b", not "...:; a; b"."""
    with pytest.raises(SystemExit):
        cli._fail("refusing to resume from it. Differences:\n  a: stored 1 vs now 2\n  b: stored on vs now off")
    assert capsys.readouterr().err == ("jaxmem: error: refusing to resume from it. Differences: a: stored 1 vs now 2; "
                                       "b: stored on vs now off\n")


def test_a_full_disk_is_one_line_naming_the_file_and_what_was_kept(tmp_path, capsys, monkeypatch):
    """`jaxmem report` into a full disk: one line naming the figure (the earlier one kept
    whole); an OSError's notes (a checkpoint not written, the one kept) close the line."""
    import errno

    from matplotlib.figure import Figure

    import jaxmem

    res = tmp_path / "res"
    n, f32 = 20, np.ones(20, np.float32)
    keep = jaxmem.kfold(n, 2, seed=0).keep
    jaxmem.MemorizationResult(  # scores without training: the report is what is tested
        U=-f32, V=-2 * f32, M=f32, stderr=f32, dof=f32, n_in=np.ones(n, np.int32), n_out=np.ones(n, np.int32),
        highly_memorized=np.arange(n) > 17, threshold=1.0, ll=np.zeros(keep.shape, np.float32), keep=keep,
        fold=np.zeros(n, np.int32), labels=np.arange(n, dtype=np.int32), logp_full=-f32, leverage=None,
        label_memorization=None, tracked_epochs=np.zeros(0, np.int32), M_by_epoch=np.zeros((0, n), np.float32),
        history={}, config={}).save(res)
    (res / "figure3_logp.png").write_bytes(b"an earlier report's figure")

    def full(self, fname, **kwargs):  # noqa: ARG001
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    code, _, err = run_main(capsys, "report", res)
    assert_one_line_error(code, err, f"No space left on device: {res / 'memorization_distribution.png'}")
    assert sorted(p.name for p in res.iterdir()) == ["config.json", "figure3_logp.png", "result.npz", "scores.csv"]
    assert (res / "figure3_logp.png").read_bytes() == b"an earlier report's figure"

    def failed_save(args):  # noqa: ARG001
        e = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "checkpoints"))
        e.add_note("the checkpoint of epoch 3 was not written; epoch 2 is kept: free space and rerun to resume")
        raise e

    monkeypatch.setattr(cli, "_cmd_report", failed_save)
    code, _, err = run_main(capsys, "report", res)
    assert err == (f"jaxmem: error: No space left on device: {tmp_path / 'out' / 'checkpoints'} (the checkpoint of "
                   "epoch 3 was not written; epoch 2 is kept: free space and rerun to resume)\n")
