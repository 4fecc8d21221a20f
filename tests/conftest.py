"""Test configuration: 8 simulated CPU devices, set before jax is imported.

Sharded kernels are tested on a 1-device mesh (``jax.devices()[:1]``) and on the
8-device mesh in the same process, and must agree to float tolerance.
"""
import os
import subprocess
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Subprocess tests (CLI, resume after SIGKILL, multi-process) recompile the same
# programs; a persistent cache shared by the whole run keeps the suite short.
_CACHE = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_CACHE))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def devices8():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 simulated CPU devices, got {len(devs)}"
    return devs


@pytest.fixture(scope="session")
def fresh_python():
    """``run(script, *args, env=None, timeout=300) -> CompletedProcess``: ``script`` in a
    new Python process, whose JAX sets up its own devices: this suite's forced 8 CPU
    devices (``XLA_FLAGS``, ``JAX_NUM_CPU_DEVICES``) are not passed on, ``env`` is added.
    Fails the test with the script's stderr if it exits non-zero."""

    def run(script, *args, env=None, timeout=300):
        environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
        environ.update(env or {})
        proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=environ,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run
