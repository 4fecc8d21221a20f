"""Membership plans: invariants, determinism, validation, save/load."""
import time

import numpy as np
import pytest

from jaxmem.membership import Plan, balanced_subsets, kfold, load_plan, random_subsets


@pytest.mark.parametrize("n,k,repeats", [(10, 3, 2), (101, 10, 3), (7, 7, 1)])
def test_kfold_invariants(n, k, repeats):
    plan = kfold(n, k, repeats, seed=3)
    assert plan.keep.shape == (k * repeats, n) and plan.keep.dtype == np.bool_
    assert (plan.n, plan.num_models, plan.kind) == (n, k * repeats, "kfold")
    out = ~plan.keep.reshape(repeats, k, n)
    # each example held out by exactly one model per repeat
    np.testing.assert_array_equal(out.sum(axis=1), 1)
    np.testing.assert_array_equal(plan.out_counts(), repeats)
    np.testing.assert_array_equal(plan.in_counts(), repeats * (k - 1))
    # fold sizes differ by at most one, and add up to n
    sizes = out.sum(axis=2)
    assert (sizes.max(axis=1) - sizes.min(axis=1) <= 1).all()
    np.testing.assert_array_equal(sizes.sum(axis=1), n)
    # the fold array is the model that holds each example out, repeat-major
    for r in range(repeats):
        for i in range(n):
            m = r * k + plan.fold[r, i]
            assert not plan.keep[m, i]
        np.testing.assert_array_equal(plan.fold_of_example(0), plan.fold[:, 0])
    for m in range(plan.num_models):
        tr, ho = plan.train_indices(m), plan.heldout_indices(m)
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, ho])), np.arange(n))
        np.testing.assert_array_equal(ho, np.flatnonzero(plan.fold[m // k] == m % k))
    assert plan.validate() is plan


def test_kfold_deterministic_and_seeded():
    a, b, c = kfold(50, 5, 2, seed=1), kfold(50, 5, 2, seed=1), kfold(50, 5, 2, seed=2)
    assert a == b and a != c
    np.testing.assert_array_equal(a.keep, b.keep)
    # repeats are different assignments, not copies of each other
    assert not np.array_equal(a.fold[0], a.fold[1])
    with pytest.raises(ValueError):  # read-only: a frozen plan stays frozen
        a.keep[0, 0] = False


def test_kfold_is_linear_time():
    # 1e6 examples x 100 models: a quadratic construction would never finish.
    # CPU time of this process, not wall time: the construction is single-threaded
    # numpy, and other jobs on a shared machine must not make the bound flaky.
    t = time.process_time()
    plan = kfold(1_000_000, 10, 10, seed=0)
    elapsed = time.process_time() - t
    assert plan.keep.shape == (100, 1_000_000)
    np.testing.assert_array_equal(plan.out_counts()[:1000], 10)
    assert elapsed < 2.0, elapsed  # ~0.5 s CPU measured on the 2-core dev machine


def test_random_subsets():
    plan = random_subsets(200, 30, 0.7, seed=5)
    np.testing.assert_array_equal(plan.keep.sum(axis=1), 140)  # exactly round(rate * n)
    assert plan == random_subsets(200, 30, 0.7, seed=5)
    assert plan != random_subsets(200, 30, 0.7, seed=6)
    # inclusion frequency per example ~ rate: 30 * 200 Bernoulli-ish draws, sd ~ 0.006
    assert abs(plan.keep.mean(axis=0).mean() - 0.7) < 1e-12  # exact by construction
    assert 0.6 < plan.keep[:, :100].mean() < 0.8


def test_balanced_subsets():
    plan = balanced_subsets(300, 8, seed=0)
    np.testing.assert_array_equal(plan.in_counts(), 4)
    np.testing.assert_array_equal(plan.out_counts(), 4)
    assert plan == balanced_subsets(300, 8, seed=0)
    # the halves differ between examples (not one fixed split)
    assert len({tuple(col) for col in plan.keep.T}) > 10


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: kfold(10, 1), "k must be an integer >= 2"),
        (lambda: kfold(5, 6), "k=6 folds need at least k examples"),
        (lambda: kfold(10, 2, repeats=0), "repeats must be an integer >= 1"),
        (lambda: random_subsets(10, 4, 0.0), "strictly between 0 and 1"),
        (lambda: random_subsets(10, 4, 1.0), "strictly between 0 and 1"),
        (lambda: random_subsets(10, 4, 1.5), "strictly between 0 and 1"),
        (lambda: random_subsets(10, 4, 0.01), "rounds to 0"),
        (lambda: random_subsets(10, 1, 0.5), "num_models must be an integer >= 2"),
        (lambda: balanced_subsets(10, 1), "num_models must be an integer >= 2"),
        (lambda: balanced_subsets(10, 5), "even num_models"),
        (lambda: Plan.from_keep(np.ones((3, 4), dtype=np.int32)), "boolean"),
        (lambda: Plan.from_keep(np.ones(4, dtype=bool)), "2-D"),
        (lambda: kfold(10, 2, seed=-1), "seed must be a non-negative integer, got -1"),
        (lambda: kfold(10, 2, seed=1.5), "seed must be a non-negative integer, got 1.5"),
        (lambda: kfold(10, 2, seed=None), "seed must be a non-negative integer, got None"),
        (lambda: random_subsets(10, 2, 0.5, seed=-3), "seed must be a non-negative integer, got -3"),
        (lambda: balanced_subsets(10, 2, seed=True), "seed must be a non-negative integer, got True"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_coverage_api_names_examples():
    keep = np.array(
        [
            [True, True, False, True, False],
            [True, False, False, True, False],
        ]
    )
    plan = Plan.from_keep(keep)
    np.testing.assert_array_equal(plan.missing_in(), [2, 4])
    np.testing.assert_array_equal(plan.missing_out(), [0, 3])
    with pytest.raises(ValueError) as e:
        plan.validate()
    msg = str(e.value)
    assert "no model trains on 2 examples: [2, 4]" in msg
    assert "no model holds out 2 examples: [0, 3]" in msg
    # long lists are cut short but the count is exact
    big = Plan.from_keep(np.ones((2, 50), dtype=bool))
    with pytest.raises(ValueError, match=r"50 examples: \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\.\]"):
        big.validate()


@pytest.mark.parametrize(
    "plan",
    [
        kfold(23, 4, 3, seed=9),
        random_subsets(23, 6, 0.5, seed=1),
        balanced_subsets(23, 6, seed=2),
        Plan.from_keep(np.eye(3, dtype=bool)),
    ],
    ids=["kfold", "random", "balanced", "custom"],
)
def test_save_load_roundtrip(plan, tmp_path):
    path = tmp_path / "plan.npz"
    plan.save(path)
    loaded = load_plan(path)
    assert loaded == plan
    assert loaded.metadata() == plan.metadata()
    np.testing.assert_array_equal(loaded.keep, plan.keep)
    if plan.fold is not None:
        np.testing.assert_array_equal(loaded.fold, plan.fold)
        assert loaded.fold.dtype == np.int32
    else:
        assert loaded.fold is None
    # a path without the .npz suffix is written where asked
    plan.save(tmp_path / "plain")
    assert load_plan(tmp_path / "plain") == plan


def test_load_rejects_foreign_file(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a jaxmem plan"):
        load_plan(path)


def test_plan_parts_must_agree():
    good = kfold(12, 3, 2, seed=4)
    parts = {"keep": good.keep, "kind": "kfold", "seed": 4, "k": 3, "repeats": 2, "rate": 2 / 3, "fold": good.fold}
    assert Plan(**parts) == good
    assert kfold(12, 3, seed=np.int64(4)).seed == 4 and type(kfold(12, 3, seed=np.int64(4)).seed) is int
    fold = good.fold.copy()
    fold[1, 5] = (fold[1, 5] + 1) % 3  # keep says another model of repeat 1 holds example 5 out
    for change, match in [
        ({"fold": fold}, r"fold disagrees with keep at example 5: fold\[1, 5\] = "),
        ({"fold": np.where(good.fold == 0, 3, good.fold)}, r"fold values must be folds in \[0, 3\)"),
        ({"fold": good.fold.astype(float)}, "fold must be an integer array"),
        ({"fold": good.fold[:1]}, r"fold must be \[repeats=2, examples=12\]"),
        ({"fold": None}, "needs k, repeats and fold; missing fold"),
        ({"k": 4, "rate": None}, r"k=4 and repeats=2 has k \* repeats = 8 models, but keep has 6"),
        ({"repeats": 3}, "k \\* repeats = 9 models"),
        ({"rate": 0.5}, r"rate \(k-1\)/k"),
        ({"rate": "x"}, r"rate \(k-1\)/k = 0\.666.*, got 'x'"),
        ({"seed": -2}, "seed must be a non-negative integer"),
        ({"kind": "custom"}, "a 'custom' plan must leave them None, got k, repeats, fold"),
    ]:
        with pytest.raises(ValueError, match=match):
            Plan(**{**parts, **change})


def test_subset_plan_metadata_must_agree_with_keep():
    """A "random" or "balanced" plan's metadata (recorded in a run's config.json) states a
    design; a hand-built or edited plan whose keep breaks it is refused, not recorded."""
    rnd, bal = random_subsets(20, 4, 0.3, seed=1), balanced_subsets(20, 4, seed=1)
    assert Plan(keep=rnd.keep, kind="random", seed=1, rate=0.3) == rnd
    assert Plan(keep=bal.keep, kind="balanced", seed=1) == bal  # rate None: 0.5
    for parts, match in [
        ({"keep": np.eye(4, dtype=bool), "kind": "balanced"},
         r"every example in exactly 2 of its 4 models; 4 examples: \[0, 1, 2, 3\] are not \(example 0 is in 1\)"),
        ({"keep": bal.keep, "kind": "balanced", "rate": 0.3}, "'balanced' plan has rate 0.5"),
        ({"keep": bal.keep[:3], "kind": "balanced"}, "even number of models, keep has 3"),
        ({"keep": rnd.keep, "kind": "random", "rate": 7.0}, r"strictly between 0 and 1, got 7\.0"),
        ({"keep": rnd.keep, "kind": "random"}, "needs its rate"),
        ({"keep": rnd.keep, "kind": "random", "rate": 0.5},
         r"round\(rate \* n\) = 10 of its 20 examples; model 0 trains on 6 \(4 models differ\)"),
        ({"keep": rnd.keep, "kind": "custom", "rate": 0.3}, "a 'custom' plan has no rate"),
    ]:
        with pytest.raises(ValueError, match=match):
            Plan(**parts)


def test_load_plan_errors_name_the_file(tmp_path):
    import json

    with pytest.raises(FileNotFoundError):
        load_plan(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="is a directory"):
        load_plan(tmp_path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.npz' is not a jaxmem plan file"):
        load_plan(junk)
    plan = kfold(10, 2, seed=1)
    np.save(tmp_path / "array.npy", plan.keep)
    with pytest.raises(ValueError, match=r"array\.npy' is not a jaxmem plan \(a single \.npy array"):
        load_plan(tmp_path / "array.npy")
    meta = plan.metadata()
    cases = {
        "json": ({"keep": plan.keep, "metadata": np.array("{bad")}, "metadata is not valid JSON"),
        "list": ({"keep": plan.keep, "metadata": np.array("[1]")}, "must be a JSON object"),
        "keys": ({"keep": plan.keep, "metadata": np.array('{"format_version": 1}')},
                 "metadata lacks kind, n, num_models"),
        "k": ({"keep": plan.keep, "fold": plan.fold, "metadata": np.array(json.dumps({**meta, "k": 7}))},
              "k=7 and repeats=1 has k \\* repeats = 7 models"),
        "fold": ({"keep": plan.keep, "fold": 1 - plan.fold, "metadata": np.array(json.dumps(meta))},
                 "fold disagrees with keep at example 0"),
    }
    for name, (arrays, match) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=rf"{name}\.npz'.*{match}"):
            load_plan(path)


def test_a_plan_saved_into_a_full_disk_keeps_the_earlier_file(tmp_path, monkeypatch):
    """Plan.save wrote in place: a full disk left half a plan at the path. It writes
    under a temporary name and renames it: the earlier plan stays readable, nothing else
    is left, and the error names the file."""
    import errno

    path = tmp_path / "plan.npz"
    first = kfold(20, 4, seed=0)
    first.save(path)
    real = np.savez_compressed

    def full_disk(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    with pytest.raises(OSError, match=r"No space left on device: '.*plan\.npz'") as err:
        kfold(20, 5, seed=1).save(path)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.setattr(np, "savez_compressed", real)
    assert load_plan(path) == first and sorted(p.name for p in tmp_path.iterdir()) == ["plan.npz"]
