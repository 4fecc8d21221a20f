"""Subprocess of tests/test_checkpoint.py: train a tiny ensemble into a run directory.

Usage: python tests/_resume_worker.py RUN_DIR OUT.npz [SLEEP_SECONDS]
Sleeps after every epoch (so the test can kill it mid-training), resumes from RUN_DIR
if it holds a checkpoint, and writes the final parameters to OUT.npz.
"""
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxmem import ensemble  # noqa: E402
from jaxmem.mesh import make_mesh  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_checkpoint import EPOCHS, KEEP, X, tiny  # noqa: E402


def main():
    run_dir, out = sys.argv[1], sys.argv[2]
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    if cache := os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", cache)
    result = ensemble.fit(
        tiny, 1e-2, X, KEEP, epochs=EPOCHS, batch_size=8, seed=11, run_dir=run_dir,
        progress=False, mesh=make_mesh(1), callback=lambda *a: time.sleep(pause),
    )
    np.savez(out, *[np.asarray(a) for a in jax.tree.leaves(result.train_state.params)])


if __name__ == "__main__":
    main()
