"""Run directories: orbax round trips, refusal of other configurations, and resumption
after a SIGKILL that ends with the same parameters as an uninterrupted run."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxmem import ensemble
from jaxmem.checkpoint import (
    CheckpointDamagedError,
    ConfigMismatchError,
    RunCheckpoints,
    RunDirectoryBusyError,
    check_x64,
    fingerprint_array,
    latest_epoch,
    provenance,
    run_lock,
)
from jaxmem.mesh import make_mesh


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, h: int = 8):
        self.enc = nnx.Linear(4, h, rngs=rngs)
        self.dec = nnx.Linear(h, 4, rngs=rngs)

    def loss(self, x, key):
        noisy = x + 0.1 * jax.random.normal(key, x.shape)
        return jnp.sum((self.dec(jnp.tanh(self.enc(noisy))) - x) ** 2, axis=-1)


def tiny(seed, h=8):
    return Tiny(nnx.Rngs(seed), h)


EPOCHS = 8
X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
KEEP = np.ones((2, 40), bool)
KEEP[0, ::2] = False
KEEP[1, 1::2] = False


def test_round_trip_keeps_keys_and_last_checkpoints(tmp_path):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "k": jax.random.split(jax.random.key(4), 2),
            "n": jnp.int32(7)}
    assert latest_epoch(tmp_path) is None  # nothing there yet
    ck = RunCheckpoints(tmp_path, {"a": 1}, max_to_keep=2)
    for e in (1, 2, 3):
        ck.save(e, jax.tree.map(lambda a: a + e if a.dtype == jnp.float32 else a, tree), {"e": [e]})
    ck.close()
    ck = RunCheckpoints(tmp_path, {"a": 1}, max_to_keep=2)
    assert ck.latest_epoch() == 3 == latest_epoch(tmp_path)  # the manager's and the directory's
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2, 3]
    got, hist = ck.restore(tree)
    assert hist == {"e": [3]}
    np.testing.assert_array_equal(got["w"], np.asarray(tree["w"]) + 3)
    np.testing.assert_array_equal(jax.random.key_data(got["k"]), jax.random.key_data(tree["k"]))
    assert int(got["n"]) == 7
    ck.close()


def test_plan_fingerprint_sees_one_flipped_entry():
    other = KEEP.copy()
    other[0, 0] = ~other[0, 0]
    assert fingerprint_array(KEEP) != fingerprint_array(other)
    assert fingerprint_array(KEEP) == fingerprint_array(KEEP.copy())


def nan_after(steps: int, lr: float = 1e-2):
    """SGD whose updates turn NaN from step ``steps`` on: a run that diverges on cue."""
    import optax

    def init(params):
        return jnp.zeros([], jnp.int32)

    def update(grads, count, params=None):
        poison = jnp.where(count >= steps, jnp.nan, 1.0)
        return jax.tree.map(lambda g: -lr * poison * g, grads), count + 1

    return optax.GradientTransformation(init, update)


def test_divergence_stops_training_and_keeps_the_last_finite_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    steps = 3  # per epoch: 20 training examples per member, batch 8
    with pytest.raises(ensemble.TrainingDivergedError,
                       match=rf"diverged in epoch 3: member\(s\) \[0, 1\] of 2 .*\(nan, nan\).*"
                             rf"{run} keeps the checkpoint of epoch 2"):
        ensemble.fit(tiny, nan_after(2 * steps), X, KEEP, epochs=EPOCHS, batch_size=8, seed=0,
                     run_dir=run, progress=False, mesh=make_mesh(1))
    assert latest_epoch(run) == 2  # epoch 3's NaN state was never written
    template = ensemble.make(tiny, nan_after(2 * steps), KEEP, batch_size=8, mesh=make_mesh(1)).init(0)
    with open(os.path.join(run, "config.json")) as f:
        ck = RunCheckpoints(run, json.load(f), max_to_keep=3)
    state, hist = ck.restore(template, 2)
    ck.close()
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))
    assert np.isfinite(hist["train_loss"]).all() and len(hist["train_loss"]) == 2
    # The last step of an epoch makes the parameters NaN while every loss of the epoch (of
    # the parameters before each step) is finite: still refused before its checkpoint.
    run2 = str(tmp_path / "run2")
    with pytest.raises(ensemble.TrainingDivergedError,
                       match=r"diverged in epoch 1: member\(s\) \[0, 1\] of 2 have non-finite parameters; "
                             r".*holds no checkpoint yet"):
        ensemble.fit(tiny, nan_after(steps - 1), X, KEEP, epochs=EPOCHS, batch_size=8, seed=0,
                     run_dir=run2, progress=False, mesh=make_mesh(1))
    assert latest_epoch(run2) is None
    # a learning rate that is not a positive finite number is refused before anything trains
    for lr in (-1e-3, float("nan"), 0.0):
        with pytest.raises(ValueError, match="learning_rate must be a positive finite number"):
            ensemble.fit(tiny, lr, X, KEEP, epochs=1, batch_size=8, progress=False)
    for tx in ("1e-3", None):
        with pytest.raises(ValueError, match="tx must be an optax GradientTransformation or a learning rate"):
            ensemble.fit(tiny, tx, X, KEEP, epochs=1, batch_size=8, progress=False)
    for name, value in (("epochs", 1.5), ("seed", 1.5), ("seed", -1), ("batch_size", 2.5)):
        with pytest.raises(ValueError, match=f"{name} must be"):
            ensemble.fit(tiny, 1e-3, X, KEEP, **{"epochs": 1, "batch_size": 8, name: value}, progress=False)
    # data with NaN are refused before anything trains, naming the examples
    bad = X.copy()
    bad[[5, 17], 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in 2 example\(s\), the first \[5, 17\]"):
        ensemble.fit(tiny, 1e-2, bad, KEEP, epochs=1, batch_size=8, progress=False, mesh=make_mesh(1))


def test_other_configuration_is_refused(tmp_path):
    run = str(tmp_path / "run")
    kw = dict(epochs=1, batch_size=8, seed=0, run_dir=run, progress=False, mesh=make_mesh(1))
    ensemble.fit(tiny, 1e-2, X, KEEP, **kw)
    other_plan = KEEP[::-1].copy()
    with pytest.raises(ConfigMismatchError, match="plan_sha256"):
        ensemble.fit(tiny, 1e-2, X, other_plan, **kw)
    shapes = r"model.params.\['enc'\]\['kernel'\].value: stored .float32\[4, 8\]. vs now .float32\[4, 6\]"
    with pytest.raises(ConfigMismatchError, match=shapes):
        ensemble.fit(lambda s: tiny(s, h=6), 1e-2, X, KEEP, **kw)
    with pytest.raises(ConfigMismatchError, match="learning_rate"):
        ensemble.fit(tiny, 3e-2, X, KEEP, **kw)
    with pytest.raises(ConfigMismatchError, match="sha256"):
        ensemble.fit(tiny, 1e-2, X + 1.0, KEEP, **kw)
    # more epochs of the same configuration is a resume, not a mismatch
    res = ensemble.fit(tiny, 1e-2, X, KEEP, **{**kw, "epochs": 2})
    assert res.history["train_loss"].shape == (2, 2)
    # fewer epochs than the run holds would silently return the later state: refused
    with pytest.raises(ConfigMismatchError, match="epoch 2, past the 1 epoch"):
        ensemble.fit(tiny, 1e-2, X, KEEP, **kw)


def test_configuration_without_checkpoints_is_replaced(tmp_path):
    """A run stopped before its first checkpoint has no state to mix with another
    configuration's: its config.json is replaced, not a reason to refuse (before, a new run
    in its place was refused, "refusing to resume from it", with nothing to resume)."""
    run = str(tmp_path / "run")
    kw = dict(epochs=2, batch_size=8, seed=0, run_dir=run, progress=False, mesh=make_mesh(1), checkpoint_every=10)

    def stop(epoch, state, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensemble.fit(tiny, 1e-2, X, KEEP, callback=stop, **kw)
    assert latest_epoch(run) is None
    res = ensemble.fit(tiny, 3e-2, X, KEEP, **kw)  # another learning rate: a new run
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["optimizer"]["config"]["learning_rate"] == 3e-2
    ref = ensemble.fit(tiny, 3e-2, X, KEEP, **{**kw, "run_dir": None})
    for a, b in zip(jax.tree.leaves(res.train_state.params), jax.tree.leaves(ref.train_state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # trained from scratch
    # with a checkpoint behind it, the configuration is checked as before
    with pytest.raises(ConfigMismatchError, match="learning_rate"):
        ensemble.fit(tiny, 1e-2, X, KEEP, **kw)
    # a damaged config.json is named even with nothing behind it
    ck = RunCheckpoints(tmp_path / "empty", {"a": 1})
    ck.close()
    (tmp_path / "empty" / "config.json").write_text("{bad")
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        RunCheckpoints(tmp_path / "empty", {"a": 2})


def test_two_runs_in_one_directory_never_mix_their_states(tmp_path):
    """A second run is refused while the first holds the directory (the lock test below).
    Where nothing is locked (no flock), a configuration with no checkpoint behind it is
    replaced, so a second run started in a directory while the first has no checkpoint yet
    takes it over: the first run's next save is refused (config.json is no longer its own),
    and a checkpoint saved under another configuration anyway (the two raced) is refused on
    restore, not resumed from."""
    a = RunCheckpoints(tmp_path, {"lr": 0.1})
    # the second run, as it would write config.json without the lock
    (tmp_path / "config.json").write_text(json.dumps({"format": 1, "lr": 0.001}))
    with pytest.raises(ConfigMismatchError, match=r"(?s)now holds another run's configuration .*refusing to save "
                                                  r"checkpoint 1 under it .*lr: stored 0.001 vs now 0.1"):
        a.save(1, {"w": jnp.full(3, 111.0)}, {})
    a.close()
    assert latest_epoch(tmp_path) is None
    # the race: a's save checked config.json just before b replaced it
    a = RunCheckpoints(tmp_path / "race", {"lr": 0.1})
    a.save(1, {"w": jnp.full(3, 111.0)}, {})
    a.close()
    (tmp_path / "race" / "config.json").write_text(json.dumps({"format": 1, "lr": 0.001}))
    b = RunCheckpoints(tmp_path / "race", {"lr": 0.001})
    with pytest.raises(ConfigMismatchError, match=r"(?s)checkpoint 1 in .* was saved by a run of another configuration "
                                                  r".*delete .*/checkpoints/1.*lr: stored 0.1 vs now 0.001"):
        b.restore({"w": jnp.zeros(3)})
    b.close()


def _in_thread(fn):
    """fn() in another thread: what it raised (or None)."""
    out = []

    def target():
        try:
            fn()
            out.append(None)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return out[0]


def test_a_run_directory_is_held_by_one_run_at_a_time(tmp_path):
    """Two live runs in one directory (two terminals, two jobs of an array) used to share
    it until one's save or restore failed on the other's configuration, or, in the window
    between a save's check and another run's replacement of config.json, never. Now the
    second is refused up front, naming the holder; a killed holder leaves no stale lock.
    Within a thread the lock is re-entrant (jaxmem run holds it around memorization)."""
    run = tmp_path / "run"
    a = RunCheckpoints(run, {"lr": 0.1})
    err = _in_thread(lambda: RunCheckpoints(run, {"lr": 0.1}))
    assert isinstance(err, RunDirectoryBusyError), err
    assert str(err).startswith(f"run_dir {run} is in use by another run (pid {os.getpid()} on ")
    assert "another thread of this process" in str(err)
    err = _in_thread(lambda: ensemble.fit(tiny, 1e-2, X, KEEP, epochs=1, batch_size=8, progress=False, run_dir=run))
    assert isinstance(err, RunDirectoryBusyError), err  # fit opens it the same way
    (tmp_path / "link").symlink_to(run)
    with run_lock(run), run_lock(tmp_path / "link"):  # the same thread, by another name: nested
        pass
    assert isinstance(_in_thread(lambda: RunCheckpoints(tmp_path / "link", {"lr": 0.1})), RunDirectoryBusyError)
    assert (run / ".jaxmem-lock").exists()
    a.close()
    assert sorted(os.listdir(run)) == ["checkpoints", "config.json"]  # the lock file goes with the lock
    assert _in_thread(lambda: RunCheckpoints(run, {"lr": 0.1}).close()) is None
    # the holder killed with SIGKILL: the kernel drops its lock with the process
    held = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom jaxmem.checkpoint import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)", str(held)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusyError, match=f"pid {proc.pid} on "):
            RunCheckpoints(held, {"lr": 0.1})
    finally:
        proc.kill()
        proc.wait()
    assert (held / ".jaxmem-lock").exists()  # left behind by the killed run, but held by nobody
    RunCheckpoints(held, {"lr": 0.1}).close()
    assert not (held / ".jaxmem-lock").exists()


def test_a_refused_resume_releases_the_directory(tmp_path):
    """fit opened the run directory (taking its lock) before the checks of its checkpoint,
    and closed it only on some of their errors: a history holding a non-number (it passed
    the row check) left the directory held for the rest of the process, and every later
    run there was refused as busy, naming the caller's own pid."""
    ensemble.fit(tiny, 1e-2, X, KEEP, epochs=1, batch_size=8, progress=False, run_dir=tmp_path)
    (history_file,) = glob.glob(f"{tmp_path}/checkpoints/1/history/metadata")  # as in the test below
    with open(history_file) as f:
        history = json.load(f)
    history["train_loss"][0][0] = "oops"
    with open(history_file, "w") as f:
        json.dump(history, f)
    for _ in range(2):  # the second time is not refused as busy
        with pytest.raises(CheckpointDamagedError, match="row 0 does not hold one number per member"):
            ensemble.fit(tiny, 1e-2, X, KEEP, epochs=2, batch_size=8, progress=False, run_dir=tmp_path)
    assert not (tmp_path / ".jaxmem-lock").exists()
    assert _in_thread(lambda: RunCheckpoints(tmp_path, json.loads((tmp_path / "config.json").read_text()),
                                             mutable=("epochs",)).close()) is None


def test_each_checkpoint_holds_the_history_of_its_own_epochs(tmp_path):
    """orbax writes a checkpoint's history JSON in the background while fit appends the next
    epochs to the same lists: checkpoints held the rows of later epochs (8 of 20 here on the
    old code), which a resume then carried as extra epochs. Saved as a copy now."""
    ensemble.fit(tiny, 1e-2, X, KEEP, epochs=6, batch_size=8, progress=False, run_dir=tmp_path,
                 keep_checkpoints=10)
    for epoch in range(1, 7):
        (meta,) = glob.glob(f"{tmp_path}/checkpoints/{epoch}/history/metadata")
        with open(meta) as f:
            history = json.load(f)
        assert [len(history[k]) for k in ("train_loss", "heldout_loss")] == [epoch, epoch]


def _damage(step_dir, how):
    """Junk into a checkpoint's files: ``truncate`` the array data, or overwrite the ``manifest``."""
    pattern = "**/d/*" if how == "truncate" else "**/manifest.ocdbt"
    files = glob.glob(os.path.join(step_dir, "state", pattern), recursive=True)
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            if how == "truncate":
                fh.truncate(os.path.getsize(f) // 2)
            else:
                fh.write(b"garbage")
                fh.truncate()


def test_damaged_checkpoint_is_refused_and_kept(tmp_path):
    run = str(tmp_path / "run")
    kw = dict(batch_size=8, seed=0, progress=False, mesh=make_mesh(1))
    ref = ensemble.fit(tiny, 1e-2, X, KEEP, epochs=2, run_dir=run, **kw)
    for how in ("truncate", "manifest"):
        damaged = str(tmp_path / how)
        shutil.copytree(run, damaged)
        _damage(os.path.join(damaged, "checkpoints", "2"), how)
        # refused, not resumed from epoch 1 or started over: both checkpoints stay as they are
        with pytest.raises(CheckpointDamagedError,
                           match=rf"checkpoint 2 in {damaged} is damaged or unreadable \(ValueError: .+\); the "
                                 rf"earlier checkpoint 1 is kept: deleting {damaged}/checkpoints/2 resumes from it"):
            ensemble.fit(tiny, 1e-2, X, KEEP, epochs=3, run_dir=damaged, **kw)
        assert sorted(os.listdir(os.path.join(damaged, "checkpoints"))) == ["1", "2"]
    # as the message says: without the damaged checkpoint the run resumes from the earlier one
    shutil.rmtree(os.path.join(damaged, "checkpoints", "2"))
    res = ensemble.fit(tiny, 1e-2, X, KEEP, epochs=2, run_dir=damaged, **kw)
    for a, b in zip(jax.tree.leaves(res.train_state.params), jax.tree.leaves(ref.train_state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # an empty folder of a later epoch (e.g. a partial copy) is not a checkpoint: said at once
    os.makedirs(os.path.join(damaged, "checkpoints", "9"))
    with pytest.raises(ConfigMismatchError, match=r"holds a checkpoint of epoch 9, past the 3 epoch\(s\) asked for.*"
                                                  r"\(but .*/checkpoints/9 holds no state or history: not a whole "
                                                  r"checkpoint; if it is an empty or partly copied folder, delete"):
        ensemble.fit(tiny, 1e-2, X, KEEP, epochs=3, run_dir=damaged, **kw)
    os.rmdir(os.path.join(damaged, "checkpoints", "9"))
    # the only checkpoint damaged; a checkpoint that reads but has other leaves is a mismatch
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.int32(7)}
    ck = RunCheckpoints(tmp_path / "one", {"a": 1})
    ck.save(1, tree, {})
    ck.close()
    _damage(str(tmp_path / "one" / "checkpoints" / "1"), "truncate")
    ck = RunCheckpoints(tmp_path / "one", {"a": 1})
    with pytest.raises(CheckpointDamagedError, match="no earlier checkpoint: deleting .*/1 starts the run over"):
        ck.restore(tree)
    ck.save(2, tree, {"e": 2})
    ck.wait()
    with pytest.raises(ConfigMismatchError, match=r"checkpoint 2 .* does not fit .*: stored \(2, 3\) vs now \(2, 4\)"):
        ck.restore({**tree, "w": jnp.zeros((2, 4))})
    assert ck.restore(tree)[1] == {"e": 2}  # still usable after both errors
    ck.close()


def test_unusable_run_directory_is_refused(tmp_path):
    run = str(tmp_path / "run")
    kw = dict(epochs=1, batch_size=8, seed=0, progress=False, mesh=make_mesh(1))
    ensemble.fit(tiny, 1e-2, X, KEEP, run_dir=run, **kw)
    cfg = os.path.join(run, "config.json")
    with open(cfg) as f:
        config = json.load(f)
    os.remove(cfg)  # checkpoints of an unknown run: not adopted, no config.json written
    with pytest.raises(ValueError, match=rf"{run} holds checkpoints \(epochs \[1\]\) but no config.json, so it "
                                         "cannot be checked against this run; restore config.json"):
        ensemble.fit(tiny, 1e-2, X, KEEP[::-1].copy(), run_dir=run, **kw)
    assert not os.path.exists(cfg)
    for text, what in (("{bad", "cannot be read as JSON"), ("", "cannot be read as JSON"),
                       ("[1, 2]", r"holds a JSON list, not the run's configuration")):
        with open(cfg, "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match=f"{cfg} {what}"):
            RunCheckpoints(run, config)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=f"run_dir: {afile} exists and is not a directory"):
        ensemble.fit(tiny, 1e-2, X, KEEP, run_dir=str(afile), **kw)
    with pytest.raises(ValueError, match=f"run_dir: cannot create directory {afile}/sub"):
        RunCheckpoints(afile / "sub", config)
    (tmp_path / "ckfile").mkdir()
    (tmp_path / "ckfile" / "checkpoints").write_text("")
    with pytest.raises(ValueError, match=f"run_dir: {tmp_path}/ckfile/checkpoints exists and is not a directory"):
        RunCheckpoints(tmp_path / "ckfile", config)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "_resume_worker.py")
    run, out = str(tmp_path / "run"), str(tmp_path / "params.npz")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    proc = subprocess.Popen([sys.executable, worker, run, out, "0.5"], env=env)
    ckdir = os.path.join(run, "checkpoints")
    deadline = time.time() + 90
    try:
        # wait for a completed (renamed, digit-named) checkpoint of epoch >= 2, then kill
        while time.time() < deadline:
            done = [int(d) for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
            if done and max(done) >= 2:
                break
            assert proc.poll() is None, "worker exited before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared within 90 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(out)
    killed_at = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
    assert killed_at < EPOCHS

    subprocess.run([sys.executable, worker, run, out], env=env, check=True, timeout=120)
    resumed = np.load(out)
    ref = ensemble.fit(tiny, 1e-2, X, KEEP, epochs=EPOCHS, batch_size=8, seed=11,
                       progress=False, mesh=make_mesh(1))
    ref_leaves = [np.asarray(a) for a in jax.tree.leaves(ref.train_state.params)]
    assert len(resumed.files) == len(ref_leaves)
    for i, a in enumerate(ref_leaves):
        # Same program on the same machine, RNG derived from counters: bit-identical.
        np.testing.assert_array_equal(resumed[f"arr_{i}"], a)


def _saved(run_dir, config, tree):
    """A run directory with one checkpoint (epoch 1) of ``tree`` under ``config``."""
    ck = RunCheckpoints(run_dir, config)
    ck.save(1, tree, {"e": [1]})
    ck.close()


def _restore_without_warning(run_dir, config, tree):
    """Restore the run directory's checkpoint with every warning an error."""
    import warnings

    ck = RunCheckpoints(run_dir, config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ck.restore(tree)
    finally:
        ck.close()


def _edit_configs(run_dir, edit):
    """Apply ``edit(config) -> config`` to a run directory's config.json and to the
    configuration saved with each of its checkpoints (as another jax, or an older jaxmem,
    would have written them)."""
    for path in [os.path.join(run_dir, "config.json"), *glob.glob(os.path.join(run_dir, "checkpoints", "*",
                                                                                "config", "metadata"))]:
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump(edit(config), f)


def test_provenance_is_recorded_not_compared_and_other_versions_warn_once(tmp_path):
    """The versions and device a run was written under are recorded; a resume under other
    jax/jaxlib/flax/optax versions continues (their rounding differs: the result matches
    neither version's uninterrupted run) with one warning naming both versions; a run
    directory written before provenance was recorded resumes without one. Before, nothing
    was recorded and a resume across versions was silent."""
    import warnings

    now = provenance()
    assert now["jax"] == jax.__version__ and now["platform"] == jax.devices()[0].platform
    assert {"python", "jaxlib", "flax", "optax", "device_kind"} <= set(now)
    tree = {"w": jnp.arange(3.0)}
    _saved(tmp_path, {"a": 1}, tree)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["provenance"] == now

    def older_jax(config):
        return {**config, "provenance": {**config["provenance"], "jax": "0.0.1", "flax": "0.0.2"}}

    _edit_configs(tmp_path, older_jax)
    ck = RunCheckpoints(tmp_path, {"a": 1})  # not a mismatch
    try:
        with pytest.warns(UserWarning, match=rf"jax 0\.0\.1 -> {jax.__version__}, flax 0\.0\.2 -> "
                                             r".*matches neither version's uninterrupted run"):
            restored, _ = ck.restore(tree)
        np.testing.assert_array_equal(restored["w"], tree["w"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ck.restore(tree)  # warned once
    finally:
        ck.close()
    # Written before provenance was recorded: nothing to compare, nothing to warn of.
    _edit_configs(tmp_path, lambda c: {k: v for k, v in c.items() if k != "provenance"})
    _restore_without_warning(tmp_path, {"a": 1}, tree)


def test_a_resume_on_other_cores_warns_where_a_device_spans_several(tmp_path):
    """One CPU device splits its products over the process's cores, so its rounding
    follows their number (taskset -c 0 against two cores moved M by up to 0.07 nats after
    30 epochs); a resume under another count was silent. One device per core rounds alike
    on any count: no warning there."""

    from jaxmem.mesh import cpu_cores

    now = provenance()
    assert now["cpu_cores"] == cpu_cores()
    tree = {"w": jnp.arange(3.0)}
    other = now["cpu_cores"] + 3
    for devices, warns in ((1, True), (other, False)):
        run = tmp_path / str(devices)
        _saved(run, {"a": 1, "devices": devices}, tree)
        _edit_configs(run, lambda c: {**c, "provenance": {**c["provenance"], "cpu_cores": other}})
        if not warns:
            _restore_without_warning(run, {"a": 1, "devices": devices}, tree)
            continue
        ck = RunCheckpoints(run, {"a": 1, "devices": devices})
        try:
            with pytest.warns(UserWarning, match=rf"CPU cores {other} -> {now['cpu_cores']}, over which 1 "
                                                 r"training device\(s\) split their products"):
                ck.restore(tree)
        finally:
            ck.close()


def test_an_x64_mismatch_names_the_setting_and_how_to_match_it(tmp_path):
    """A run directory trained with jax_enable_x64 on, resumed with it off: the message says
    so and how to resume (not "stored true vs now \"<missing>\"" and "use a new run
    directory", which threw the training away)."""
    tree = {"w": jnp.arange(3.0)}
    _saved(tmp_path, {"a": 1, "jax_enable_x64": True}, tree)
    cure = r"trained with jax_enable_x64 on and this process has it off .*resume it with JAX_ENABLE_X64=1"
    with pytest.raises(ConfigMismatchError, match=cure) as err:
        RunCheckpoints(tmp_path, {"a": 1})
    assert "<missing>" not in str(err.value) and "new run directory" not in str(err.value)
    # the look before a run (memorization's, before it says that it resumes) says the same
    assert not jax.config.jax_enable_x64
    with pytest.raises(ConfigMismatchError, match=cure):
        check_x64(tmp_path)
    check_x64(tmp_path / "nothing")  # no run there: nothing to refuse
    # among other differences, listed as on/off
    with pytest.raises(ConfigMismatchError, match="jax_enable_x64: stored on vs now off"):
        RunCheckpoints(tmp_path, {"a": 2})


TENSORSTORE_FULL = ('RESOURCE_EXHAUSTED: Error writing local file "{d}/checkpoints/2.orbax-checkpoint-tmp/state/'
                    'manifest.ocdbt": Failed to write 446 bytes to file 11: No space left on device '
                    "[os_error_code='28']")


def test_a_failed_save_is_an_os_error_naming_the_run_and_what_it_kept(tmp_path, monkeypatch, caplog):
    """A save that fails as orbax reports a full disk (a ValueError of tensorstore's text)
    or a read-only folder (an OSError without a file name) is an OSError of that errno
    naming run_dir, whose note names the checkpoint not written and the one kept; the
    checkpoints already complete resume. orbax's noise about it stays off stderr."""
    import errno
    import logging
    import types

    tree = {"w": jnp.arange(3.0)}
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    ck = RunCheckpoints(tmp_path, {"a": 1})  # filters what reaches this hook until closed
    ck.save(1, tree, {"e": [1]})
    ck.wait()
    # Epoch 2's save starts (nothing is written) and fails in the background.
    monkeypatch.setattr(ck._manager, "save", lambda *a, **k: None)
    ck.save(2, tree, {"e": [2]})
    full = ValueError(TENSORSTORE_FULL.format(d=tmp_path))

    def fails():
        raise full

    monkeypatch.setattr(ck._manager, "wait_until_finished", fails)
    with pytest.raises(OSError) as info:
        ck.wait()
    assert (info.value.errno, info.value.filename, info.value.__cause__) == (errno.ENOSPC, str(tmp_path), full)
    assert info.value.__notes__ == ["the checkpoint of epoch 2 was not written; epoch 1 is kept: free space and "
                                    "rerun to resume"]
    # While it is open, orbax's ERROR records and tensorstore's "Event loop is closed" are dropped,
    # and asyncio's "exception was never retrieved" of its futures (until the process ends).
    orbax_file = os.path.join(os.path.dirname(ocp.__file__), "_src", "x.py")
    with caplog.at_level(logging.INFO):
        for name, path, level, exc in (("absl", orbax_file, logging.ERROR, None),  # dropped
                                       ("absl", orbax_file, logging.WARNING, None),  # kept
                                       ("absl", __file__, logging.ERROR, None),  # kept
                                       ("asyncio", "x", logging.ERROR, full)):  # dropped
            record = logging.LogRecord(name, level, path, 1, "Task exception was never retrieved", None,
                                       (type(exc), exc, None) if exc else None)
            logging.getLogger(name).handle(record)
    assert [(r.name, r.levelno, r.pathname) for r in caplog.records] == [
        ("absl", logging.WARNING, orbax_file), ("absl", logging.ERROR, __file__)]
    closed = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
                                   exc_traceback=None, err_msg=None, object=None)
    other = types.SimpleNamespace(**{**vars(closed), "exc_value": RuntimeError("something else")})
    sys.unraisablehook(closed)
    sys.unraisablehook(other)
    assert seen == [other]
    ck.close()  # the failure was raised already: not again
    assert sys.unraisablehook == seen.append  # restored
    monkeypatch.undo()

    # A read-only folder, reported when the next save waits for this one.
    ck = RunCheckpoints(tmp_path, {"a": 1})
    assert ck.latest_epoch() == 1
    monkeypatch.setattr(ck._manager, "save", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(OSError, match="Read-only file system") as info:
        ck.save(3, tree, {"e": [3]})
    assert (info.value.errno, info.value.filename) == (errno.EROFS, str(tmp_path))
    assert info.value.__notes__ == ["the checkpoint of epoch 3 was not written; epoch 1 is kept: make it writable "
                                    "and rerun to resume"]
    monkeypatch.undo()
    ck.close()
    ck = RunCheckpoints(tmp_path, {"a": 1})
    got, hist = ck.restore(tree)
    assert hist == {"e": [1]}
    np.testing.assert_array_equal(got["w"], np.arange(3.0))
    ck.close()


def test_a_run_directory_removed_or_moved_during_the_run_is_named(tmp_path, monkeypatch):
    """The run directory moved away between saves, or its checkpoints folder removed under
    a save in flight (orbax reports a tensorstore NOT_FOUND, or recreates the folder):
    a FileNotFoundError that says so; a rerun resumes from the checkpoint moved back."""
    tree = {"w": jnp.arange(3.0)}
    run = tmp_path / "run"
    ck = RunCheckpoints(run, {"a": 1})
    ck.save(1, tree, {"e": [1]})
    ck.wait()
    os.rename(run, tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=f"run directory {run} was removed or moved during the run, so the "
                                                "checkpoint of epoch 2 was not written"):
        ck.save(2, tree, {"e": [2]})
    ck.close()
    os.rename(tmp_path / "moved", run)
    ck = RunCheckpoints(run, {"a": 1})
    assert ck.latest_epoch() == 1
    monkeypatch.setattr(ck._manager, "save", lambda *a, **k: None)
    ck.save(2, tree, {"e": [2]})
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()  # as orbax's save in flight recreates it

    def fails():
        raise ValueError(f'NOT_FOUND: Error opening "zarr" driver: Error writing "leaf_00001/.zarray" in OCDBT '
                         f'database at local file "{run}/checkpoints/2.orbax-checkpoint-tmp/state"')

    monkeypatch.setattr(ck._manager, "wait_until_finished", fails)
    with pytest.raises(FileNotFoundError, match=f"checkpoints folder {run / 'checkpoints'} was removed or moved "
                                                "during the run, so the checkpoint of epoch 2 was not written"):
        ck.close()
    assert not (run / ".jaxmem-lock").exists()  # released all the same


def test_a_released_lock_leaves_the_lock_of_a_directory_made_in_its_place(tmp_path):
    """A run directory renamed while held, and a new run's directory (with its lock file)
    made at its old path: releasing the first lock leaves the second one's file alone."""
    run = tmp_path / "run"
    with run_lock(run):
        os.rename(run, tmp_path / "renamed")
        run.mkdir()
        (run / ".jaxmem-lock").write_text("pid 1 on another host, since ...\n")
    assert (run / ".jaxmem-lock").read_text() == "pid 1 on another host, since ...\n"


def test_a_json_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """config.json written as far as a full disk allows: the earlier file stays, the
    temporary is removed, and the error names config.json."""
    import errno

    from jaxmem import checkpoint

    path = tmp_path / "config.json"
    checkpoint._write_json(str(path), {"a": 1})

    def dump(obj, f, **kwargs):  # noqa: ARG001
        f.write('{"a": ')
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", dump)
    with pytest.raises(OSError) as info:
        checkpoint._write_json(str(path), {"a": 2})
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(path))
    assert os.listdir(tmp_path) == ["config.json"] and json.loads(path.read_text()) == {"a": 1}


def test_close_twice_does_nothing_and_releases_the_directory(tmp_path):
    """A second close() raised 'list.remove(x): x not in list' from the log filter's
    release, before the lock was released."""
    ckpt = RunCheckpoints(tmp_path / "run", {"lr": 0.1})
    ckpt.save(1, {"w": np.zeros(3, np.float32)}, {"loss": [1.0]})
    ckpt.close()
    ckpt.close()
    again = RunCheckpoints(tmp_path / "run", {"lr": 0.1})  # the directory is free
    assert again.latest_epoch() == 1
    again.close()


def test_orbax_notice_of_an_unfinished_step_is_dropped(tmp_path, caplog):
    """A save interrupted in an earlier session (a notebook's "interrupt kernel") leaves
    `<epoch>.orbax-checkpoint-tmp`; saving that epoch again had orbax log an absl WARNING
    ("... Removing existing directory since it is not finalized") to Python users."""
    import logging

    tree = {"w": jnp.arange(3.0)}
    _saved(tmp_path, {"a": 1}, tree)
    ck = RunCheckpoints(tmp_path, {"a": 1})
    os.makedirs(os.path.join(ck._steps_dir, "2.orbax-checkpoint-tmp"))
    try:
        ck.restore(tree)
        with caplog.at_level(logging.INFO):
            ck.save(2, tree, {"e": [1, 2]})
            ck.wait()
    finally:
        ck.close()
    assert not [r for r in caplog.records if "not finalized" in r.getMessage()], caplog.text
    assert latest_epoch(str(tmp_path)) == 2
