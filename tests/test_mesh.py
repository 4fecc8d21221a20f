"""The mesh helpers every sharded kernel stands on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmem.mesh import make_mesh, on_cpu, pad_rows, shard_examples, sum_over_examples

X = np.random.default_rng(0).normal(size=(13, 3)).astype(np.float32)  # 13: padding on 8 devices


@pytest.mark.parametrize("ndev", [1, 8])
def test_shard_examples_drops_padding_on_either_axis(ndev):
    mesh = make_mesh(ndev)
    w = jnp.arange(3.0)
    rows = jax.jit(lambda x, w: shard_examples(lambda b, r: b @ r, mesh, x, w))(X, w)
    np.testing.assert_allclose(rows, X @ np.arange(3.0), rtol=1e-6)
    cols = jax.jit(lambda x, w: shard_examples(
        lambda b, r: r[:, None] * b.sum(1)[None], mesh, x, w, example_axis=1))(X, jnp.arange(2.0))
    assert cols.shape == (2, 13)
    np.testing.assert_allclose(cols[1], X.sum(1), rtol=1e-6)


@pytest.mark.parametrize("ndev", [1, 8])
def test_sum_over_examples_is_the_full_sum(ndev):
    gram = sum_over_examples(lambda b: b.T @ b, make_mesh(ndev), jnp.asarray(X))
    # zero padding rows add nothing; float32 sums in another order: rtol 1e-5
    np.testing.assert_allclose(gram, X.T.astype(np.float64) @ X, rtol=1e-5, atol=1e-5)


def test_pad_rows_repeats_a_real_row_and_make_mesh_checks_counts():
    padded, n = pad_rows(jnp.asarray(X), 8)
    assert n == 13 and padded.shape == (16, 3)
    np.testing.assert_array_equal(padded[13:], np.repeat(X[:1], 3, axis=0))
    zeros, _ = pad_rows(jnp.asarray(X), 8, zeros=True)
    np.testing.assert_array_equal(zeros[:13], X)
    np.testing.assert_array_equal(zeros[13:], 0)
    with pytest.raises(ValueError, match="num_devices=9"):
        make_mesh(9)
    assert on_cpu(make_mesh(1)) and on_cpu(make_mesh(8))  # the simulated devices are CPUs
    # a bool is not a count, and an empty device list was an IndexError from inside JAX
    for bad, message in ((True, "num_devices must be an integer >= 1, got True"),
                         (0, "num_devices must be an integer >= 1, got 0"), (2.0, "got 2.0")):
        with pytest.raises(ValueError, match=message):
            make_mesh(bad)
    with pytest.raises(ValueError, match="devices is empty"):
        make_mesh(devices=[])


def test_shard_examples_refuses_an_example_axis_it_cannot_place():
    with pytest.raises(ValueError, match="example_axis must be 0 or 1, got 2"):
        shard_examples(lambda b, r: b, make_mesh(1), jnp.asarray(X), example_axis=2)


def test_compiler_options_on_cpu_meshes():
    """CPU meshes get jaxmem.mesh.CPU_COMPILER_OPTIONS (where this jaxlib accepts them), and
    a program compiled with them computes what XLA's defaults compute."""
    from jaxmem import mesh as mesh_lib

    m = mesh_lib.make_mesh(1)
    for program in mesh_lib.CPU_COMPILER_OPTIONS:
        opts = mesh_lib.compiler_options(m, program)
        if not mesh_lib.cpu_options_supported(program):
            assert opts is None
            continue
        assert opts == mesh_lib.CPU_COMPILER_OPTIONS[program]
        a = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
        b = np.random.default_rng(1).standard_normal((96, 32)).astype(np.float32)
        f = lambda a, b: jax.nn.relu(a @ b + 1.0).sum(0)  # noqa: E731
        got = np.asarray(jax.jit(f, compiler_options=opts)(a, b))
        np.testing.assert_allclose(got, np.asarray(jax.jit(f)(a, b)), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got, np.maximum(np.float64(a) @ b + 1.0, 0).sum(0), rtol=1e-4, atol=1e-3)


_CPU_DEVICES_SCRIPT = """
import json, sys
import jax
import pytest
from jaxmem.mesh import cpu_cores, use_cpu_devices

out = {"cores": cpu_cores()}
for bad in (0, -1, True, 2.5, "2"):
    with pytest.raises(ValueError, match="count must be a positive integer"):
        use_cpu_devices(bad)
    with pytest.raises(ValueError, match="at_most must be a positive integer"):
        use_cpu_devices(at_most=bad)
arg = sys.argv[1]
out["set"] = (use_cpu_devices() if arg == "auto" else use_cpu_devices(at_most=1) if arg == "at_most=1"
              else use_cpu_devices(int(arg), at_most=1))
out["devices"] = len(jax.devices("cpu"))  # JAX starts here
out["again"] = use_cpu_devices()
out["same"] = use_cpu_devices(out["devices"])
try:
    use_cpu_devices(out["devices"] + 1)
except RuntimeError as e:
    out["late"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.parametrize("arg,flags,env", [
    ("auto", "", None), ("at_most=1", "", None), ("3", "", None), ("auto", "", "3"),
    ("3", "--xla_force_host_platform_device_count=5", None),
    ("auto", "--xla_force_host_platform_device_count=3", "4")])
def test_use_cpu_devices_before_jax_starts(arg, flags, env, fresh_python):
    """A fresh process: the count is set before JAX starts (one per core by default, capped
    by at_most; an explicit count ignores the cap), kept afterwards, and a different count
    once JAX has started is an error naming why; a count forced in XLA_FLAGS wins over
    ``count``, JAX_NUM_CPU_DEVICES is kept when no count is asked for, and where both are
    set the answer is JAX_NUM_CPU_DEVICES's, which JAX reads first. Regression (last case):
    it returned the flag's 3 while JAX started 4 devices."""
    import json

    environ = {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **({"JAX_NUM_CPU_DEVICES": env} if env else {})}
    proc = fresh_python(_CPU_DEVICES_SCRIPT, arg, env=environ, timeout=120)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    want = (int(env) if env else int(flags.rpartition("=")[2]) if flags else out["cores"] if arg == "auto"
            else 1 if arg == "at_most=1" else int(arg))
    assert out["set"] == out["devices"] == out["again"] == out["same"] == want
    assert "before any JAX operation" in out["late"] and f"{want} CPU device(s)" in out["late"]


def test_use_cpu_devices_keeps_a_started_backend(devices8, monkeypatch):
    """Once JAX has started, the answer is the devices it runs, whatever XLA_FLAGS says
    since (test_multihost's worker module, imported in-process, used to rewrite it)."""
    from jaxmem.mesh import use_cpu_devices

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert use_cpu_devices() == use_cpu_devices(8) == len(devices8) == 8  # conftest forced 8
    with pytest.raises(RuntimeError, match="already started with 8 CPU device"):
        use_cpu_devices(2)


def test_initialize_distributed_refuses_bad_arguments_before_jax():
    from jaxmem.mesh import initialize_distributed

    for address in ("notahost", "localhost:", ":1234", "host:port", "host:0", "host:70000", 1234):
        with pytest.raises(ValueError, match="coordinator_address must be 'host:port'"):
            initialize_distributed(address, 1, 0)
    for num in (0, -2, 1.0, "2", True):
        with pytest.raises(ValueError, match=r"num_processes must be an integer >= 1, got"):
            initialize_distributed("localhost:1234", num, 0)
    for pid in (-1, 0.0, "0"):
        with pytest.raises(ValueError, match=r"process_id must be an integer >= 0, got"):
            initialize_distributed("localhost:1234", 2, pid)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes\) = \[0, 2\), got 2"):
        initialize_distributed("[::1]:1234", 2, 2)


def test_jit_with_options_runs_under_a_callers_trace():
    """compiler_options are refused by JAX on a jit inside another trace; jit_with_options
    then runs the plain jit (bitwise the same values here: a * 2 + 1 rounds once, fused or not)."""
    from jaxmem.mesh import CPU_COMPILER_OPTIONS, cpu_options_supported, jit_with_options

    if not cpu_options_supported("training"):
        pytest.skip("this jaxlib rejects the CPU compile options")
    options = CPU_COMPILER_OPTIONS["training"]
    with pytest.raises(ValueError, match="top-level"):  # what the wrapper works around
        jax.jit(lambda a: jax.jit(jnp.tanh, compiler_options=options)(a))(X)
    f = jit_with_options(lambda a, b: a * b + 1.0, options)
    want = np.asarray(f(X, 2.0))
    np.testing.assert_array_equal(want, X * np.float32(2) + np.float32(1))
    np.testing.assert_array_equal(jax.jit(f)(X, 2.0), want)  # arguments are tracers
    np.testing.assert_array_equal(jax.jit(lambda: f(X, 2.0))(), want)  # all closed over
    np.testing.assert_array_equal(jax.lax.scan(lambda c, _: (f(c, 2.0), None), X, None, length=1)[0], want)
    assert "multiply" in f.lower(X, 2.0).as_text()
    assert jit_with_options(jnp.tanh, None)(X).shape == X.shape


_FEWER_DEVICES_SCRIPT = """
import sys, jaxmem
try:
    jaxmem.make_mesh(2)
except ValueError as err:
    print(err)
"""


def test_make_mesh_with_too_few_devices_says_how_to_get_more(fresh_python, monkeypatch):
    """make_mesh(N) with fewer devices says what decided the count and how to get N: in a
    plain Python session on a CPU (1 device), jaxmem.use_cpu_devices(N) right after the
    imports; under a count forced in XLA_FLAGS, that flag (which wins over
    use_cpu_devices); on an accelerator host, JAX_PLATFORMS=cpu. Before, it said only
    'num_devices=N but K device(s) are available', a dead end for a run to resume on N."""
    plain = fresh_python(_FEWER_DEVICES_SCRIPT, env={"JAX_PLATFORMS": "cpu"}, timeout=120).stdout
    assert plain.startswith("num_devices=2 but 1 device(s) are available; JAX runs 1 CPU device(s): call "
                            "jaxmem.use_cpu_devices(2) right after the imports, before any JAX operation"), plain
    with pytest.raises(ValueError, match=r"num_devices=9 but 8 device\(s\) are available; XLA_FLAGS="
                                         r"--xla_force_host_platform_device_count=8 .*set its count to 9"):
        make_mesh(9)  # conftest's forced 8

    class Gpu:
        platform, device_kind = "gpu", "NVIDIA H200"

    monkeypatch.setattr(jax, "devices", lambda *a: [Gpu()])
    with pytest.raises(ValueError, match=r"runs on 1 GPU device\(s\); to run on 2 CPU devices instead .*"
                                         r"JAX_PLATFORMS=cpu .*use_cpu_devices\(2\)"):
        make_mesh(2)
