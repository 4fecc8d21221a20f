"""Multi-host: 2 processes x 2 CPU devices over loopback (gloo) give the single-process matrix and scores."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import _multihost_worker as worker  # tests/ is on sys.path under pytest's default import mode
from jaxmem import likelihood, mesh
from jaxmem.scores import memorization_scores

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    out = tmp_path / "ll.npy"
    port = _free_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen([sys.executable, os.path.join(HERE, "_multihost_worker.py"), str(port), "2", str(p), str(out)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for p in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    graphdef, state, x = worker.problem()
    single = np.asarray(likelihood.loglik_matrix(graphdef, state, x, key=jax.random.key(7),
                                                 mesh=mesh.make_mesh(1), **worker.KW))
    multi = np.load(out)
    assert multi.shape == (2, 13)
    # same per-example randomness; only the float32 summation order may differ
    np.testing.assert_allclose(multi, single, rtol=1e-5, atol=1e-4)
    # the bf16 kernel too: the same rounding whichever process computes an example
    single_bf16 = np.asarray(likelihood.loglik_matrix(graphdef, state, x, key=jax.random.key(7), mesh=mesh.make_mesh(1),
                                                      matmul_dtype="bfloat16", **worker.KW))
    multi_bf16 = np.load(str(out).replace(".npy", "_bf16.npy"))
    np.testing.assert_allclose(multi_bf16, single_bf16, rtol=1e-5, atol=1e-4)
    assert np.abs(multi_bf16 - multi).max() > 0  # and it is the bf16 kernel
    # scores computed across the processes equal one process's scores of the same matrix
    M, stderr = np.load(str(out).replace(".npy", "_scores.npy"))
    ref = memorization_scores(worker.four_models(multi), worker.KEEP, mesh=mesh.make_mesh(1))
    np.testing.assert_allclose(M, ref.M, rtol=1e-6, atol=1e-6)
    assert np.isfinite(stderr).all()
    np.testing.assert_allclose(stderr, ref.stderr, rtol=1e-5, atol=1e-6)

    # Process 1 alone passed another num_samples / key, or one row too few: the same
    # ValueError in both processes, naming it. Regression: the first two returned mixed
    # matrices (process 1's columns off by up to 3.5 nats), the third left process 0 in the
    # kernel until gloo's "DEADLINE_EXCEEDED" 30 s later.
    errors = [json.loads((tmp_path / f"ll_errors{p}.json").read_text()) for p in (0, 1)]
    assert errors[0] == errors[1], errors
    assert "different num_samples (process 0: 6, process 1: 5)" in errors[0]["num_samples"]
    assert "different key (process 1: not as in process 0)" in errors[0]["key"]
    rows = errors[0]["rows"]
    assert "refused the input of process 1" in rows and "process 1 must feed rows [7]..[12] (6 rows of 13" in rows
    assert rows.endswith("got 5")

    # Process 0 alone scored the matrix with mesh=None, on its own devices. Regression: it
    # waited forever in a collective over both processes' devices (make_mesh()).
    local = np.load(str(out).replace(".npy", "_local_scores.npy"))  # the same arithmetic per example: rounding
    np.testing.assert_allclose(local[0], ref.M, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(local[1], ref.stderr, rtol=1e-5, atol=1e-6)
