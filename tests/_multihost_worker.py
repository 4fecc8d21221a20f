"""One process of the 2-process log-likelihood test (launched by tests/test_multihost.py).

Usage: python _multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT.npy

Joins a loopback cluster with gloo CPU collectives, builds the same small ensemble and
data as the test (deterministic from seeds), feeds only this process's rows
(``host_local_rows``) and writes the gathered ``[models, n]`` matrix (process 0 only),
also with ``matmul_dtype="bfloat16"``, and the scores over both processes' devices.
Then the calls that must fail in every process (``OUT_errors{pid}.json``: process 1
alone passes another ``num_samples``, another key, or one row too few), and last
process 0 alone scores the matrix with ``mesh=None`` (``OUT_local_scores.npy``), as a
"rank 0 writes the results" program does, while process 1 waits in the shutdown.
"""
import os
import sys

if __name__ == "__main__":  # the worker process; test_multihost.py also imports this module
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxmem import mesh  # noqa: E402


def problem():
    """The ensemble and data both sides use: 2 MLP VAEs, 13 examples (not a multiple of 4)."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxmem import models

    members = [models.create("mlp_vae", (4, 4), seed=s, hidden=[16], latent_dim=2) for s in (0, 1)]
    graphdef = nnx.graphdef(members[0])
    state = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(m) for m in members])
    x = np.random.default_rng(0).uniform(size=(13, 4, 4)).astype(np.float32)
    return graphdef, state, x


KW = dict(num_samples=6, example_chunk=2, sample_chunk=4)
#: a 4-model plan for the scores: every example in 2 models and out of 2 (a finite stderr)
KEEP = np.arange(13)[None, :] % 2 != np.arange(4)[:, None] % 2


def four_models(ll):
    """The 2-member matrix widened to 4 "models" for KEEP (a second, shifted copy)."""
    return np.concatenate([ll, ll[::-1] - 0.5])


def main():
    port, nproc, pid, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    mesh.initialize_distributed(f"127.0.0.1:{port}", nproc, pid, cpu_collectives="gloo")
    assert jax.process_count() == nproc and jax.device_count() == 2 * nproc, jax.devices()
    from jaxmem.likelihood import loglik_matrix_multihost

    graphdef, state, x = problem()
    rows = mesh.host_local_rows(x.shape[0])
    ll = loglik_matrix_multihost(graphdef, state, x[rows], num_examples=x.shape[0],
                                 key=jax.random.key(7), **KW)
    ll_bf16 = loglik_matrix_multihost(graphdef, state, x[rows], num_examples=x.shape[0],
                                      key=jax.random.key(7), matmul_dtype="bfloat16", **KW)
    # Scores of the gathered matrix, sharded over the examples across both processes;
    # their outputs are global arrays, gathered once more.
    from jax.experimental.multihost_utils import process_allgather

    from jaxmem.scores import memorization_scores

    s = memorization_scores(four_models(ll), KEEP, mesh=mesh.make_mesh())
    M, stderr = (np.asarray(process_allgather(a, tiled=True)) for a in (s.M, s.stderr))
    if pid == 0:
        np.save(out, ll)
        np.save(out.replace(".npy", "_bf16.npy"), ll_bf16)
        np.save(out.replace(".npy", "_scores.npy"), np.stack([M, stderr]))

    # Process 1 alone passes something else: every process must raise, none wait in the kernel.
    import json

    errors = {}
    for case, part, kw in [("num_samples", rows, dict(KW, num_samples=KW["num_samples"] - pid)),
                           ("key", rows, dict(KW, key=jax.random.key(7 + pid))),
                           ("rows", rows[: rows.size - pid], KW)]:
        kw = {"key": jax.random.key(7), **kw}
        try:
            loglik_matrix_multihost(graphdef, state, x[part], num_examples=x.shape[0], **kw)
            errors[case] = None
        except ValueError as e:
            errors[case] = str(e)
    with open(out.replace(".npy", f"_errors{pid}.json"), "w") as f:
        json.dump(errors, f)

    if pid == 0:  # alone: mesh=None means this process's devices, no collective to wait for
        s = memorization_scores(four_models(ll), KEEP)
        np.save(out.replace(".npy", "_local_scores.npy"), np.stack([np.asarray(s.M), np.asarray(s.stderr)]))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
