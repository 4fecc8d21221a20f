"""Multi-host: 2 processes x 2 CPU devices over loopback (gloo) give the single-process matrix and scores."""
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
