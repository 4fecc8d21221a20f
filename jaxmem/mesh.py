"""Devices, meshes and hosts: the one module that knows about them.

Every sharded kernel in jaxmem runs through :func:`shard_examples`: the example axis
(axis 0 of every input) is padded to a multiple of the device count, split over a 1-D
mesh with :func:`jax.shard_map`, and the padding is dropped from the result. Kernels
must therefore be *row-wise*: the output for example ``i`` depends only on input row
``i`` (and on replicated arguments), which is what makes 1 device and 8 devices give
the same numbers.

Multi-host: call :func:`initialize_distributed` in every process before any other JAX
call; :func:`make_mesh` then spans the devices of all processes, while a kernel given
``mesh=None`` (:func:`as_mesh`) runs on this process's devices alone.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxmem import _warn
from jaxmem.membership import _check_int

#: Name of the mesh axis that examples (or ensemble members) are split over.
AXIS = "d"

__all__ = [
    "AXIS",
    "make_mesh",
    "shard_examples",
    "sum_over_examples",
    "pad_rows",
    "replicate",
    "initialize_distributed",
    "cpu_cores",
    "use_cpu_devices",
    "as_mesh",
    "host_local_rows",
    "nonfinite_rows",
    "CPU_COMPILER_OPTIONS",
    "compiler_options",
    "cpu_options_supported",
    "jit_with_options",
]


def make_mesh(
    num_devices: int | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_name: str = AXIS,
) -> Mesh:
    """A 1-D mesh over ``devices`` (default: the first ``num_devices`` of ``jax.devices()``).

    The axis type is ``Auto`` so that inputs are resharded onto the mesh as needed
    (recent JAX defaults to ``Explicit``, where they are not).

    Args:
      num_devices: how many devices to use; ``None`` means all (of all processes).
      devices: explicit device list; overrides ``num_devices``.
      axis_name: name of the single mesh axis.

    Returns:
      A :class:`jax.sharding.Mesh` with one axis of size ``len(devices)``.
    """
    if devices is None:
        all_devices = jax.devices()
        if num_devices is None:
            num_devices = len(all_devices)
        num_devices = _check_int("num_devices", num_devices, 1)
        if num_devices > len(all_devices):
            raise ValueError(
                f"num_devices={num_devices} but {len(all_devices)} device(s) are available"
                + (f"; {_more_devices_advice(num_devices)}" if num_devices > len(all_devices) else "")
            )
        devices = all_devices[:num_devices]
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty: a mesh needs at least one device (None takes jax.devices())")
    return jax.make_mesh(
        (len(devices),), (axis_name,), axis_types=(AxisType.Auto,), devices=devices
    )


def as_mesh(mesh: Any, default: Mesh | None = None) -> Mesh:
    """The 1-D mesh jaxmem's kernels run on, from what a user passed as ``mesh``.

    ``None`` gives ``default``, else the :func:`make_mesh` mesh over this process's
    devices: every device in a single process; under ``jax.distributed`` with several
    processes ``jax.local_devices()``, so that a kernel called on host-local inputs
    (``scores.memorization_scores`` of the matrix that
    :func:`jaxmem.likelihood.loglik_matrix_multihost` returns in every process, called in
    process 0 only) runs within the process, instead of waiting forever for the other
    processes to join its collectives. A global mesh (``make_mesh()``) is used only when
    passed, and then every process must make the call. A
    :func:`make_mesh` mesh is returned as it is. Any other 1-D :class:`jax.sharding.Mesh`
    (another axis name, or ``jax.make_mesh``'s ``Explicit`` axis type, with which the
    kernels' ``shard_map`` specs and resharding would fail deep inside, after training)
    becomes the :func:`make_mesh` mesh over the same devices, in the same order.

    Raises:
      ValueError: ``mesh`` is not a ``Mesh``, or has more than one axis.
    """
    if mesh is None:
        if default is not None:
            return default
        return make_mesh(devices=jax.local_devices())  # all devices, with one process
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be None or a jax.sharding.Mesh (jaxmem.make_mesh), got {type(mesh).__name__}")
    if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must be 1-D (jaxmem shards one axis: examples or models); it has axes "
                         f"{dict(mesh.shape)}; use jaxmem.make_mesh")
    if mesh.axis_names == (AXIS,) and tuple(getattr(mesh, "axis_types", (AxisType.Auto,))) == (AxisType.Auto,):
        return mesh
    return make_mesh(devices=list(mesh.devices.flat))


def on_cpu(mesh: Mesh) -> bool:
    """Whether ``mesh``'s devices are CPUs (where the kernels pick CPU-friendly layouts)."""
    return all(d.platform == "cpu" for d in mesh.devices.flat)


#: XLA compile options of jaxmem's programs on CPU meshes, by program. XLA's CPU
#: backend (jaxlib 0.10 and 0.11) hands dots, and reductions it rewrites as dots, to
#: YNNPACK by default. Measured on a 2-core AMD EPYC (Zen 3), ``benchmarks/RESULTS.md``:
#:
#: - ``"training"`` (:mod:`jaxmem.ensemble`'s programs): YNNPACK for the dots alone, one
#:   call each, not for the bias-gradient and loss reductions XLA otherwise turns into
#:   small YNNPACK dots: an epoch of the paper's VAE took 8% less time (median of 7
#:   interleaved rounds), 14% and 0% less in two comparisons of 3 rounds. (Training
#:   without YNNPACK, with XLA's Eigen matmuls, took 1.39x the time.)
#:
#: The likelihood kernel (:func:`jaxmem.likelihood.loglik_matrix`) is compiled with XLA's
#: defaults. It used to be compiled with XLA's Eigen matmuls (``{"xla_cpu_experimental_
#: ynn_fusion_type": ""}``, measured 4-12% faster on one CPU device), until that program,
#: run on two CPU devices of one process, returned wrong values (by up to 4.7 nats, not
#: the same from run to run) for about 5% of the pairs of the paper's VAE (10 members x
#: 256 examples, S = 256; jaxlib 0.10.2). XLA's default compilation of the same kernel
#: agrees with one device to 0 nats there
#: (``tests/test_likelihood.py::test_two_cpu_devices_match_one``) and ran 5-6% faster
#: than the Eigen one on one and on two devices in one in-process comparison (RESULTS.md,
#: twelfth session).
#:
#: Measured on that CPU only; other CPUs may favour other settings.
CPU_COMPILER_OPTIONS = {
    "training": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


@functools.cache
def cpu_options_supported(program: str) -> bool:
    """Whether this jaxlib accepts ``CPU_COMPILER_OPTIONS[program]`` (a later one may drop them)."""
    options = CPU_COMPILER_OPTIONS[program]
    try:
        x = jax.device_put(np.float32(0), jax.devices("cpu")[0])
        jax.jit(lambda a: a + 1, compiler_options=options).lower(x).compile()
        return True
    except Exception as e:  # noqa: BLE001 - jaxlib raises JaxRuntimeError("No such compile option")
        _warn.warn(f"jaxmem: XLA rejected the CPU compile options {options} ({str(e).splitlines()[0]}); "
                      f"the {program} programs are compiled with XLA's defaults", RuntimeWarning)
        return False


def compiler_options(mesh: Mesh, program: str) -> dict[str, str] | None:
    """``jax.jit(compiler_options=...)`` for ``program``'s programs on ``mesh``:
    :data:`CPU_COMPILER_OPTIONS` on CPU meshes (where this jaxlib accepts them), else None."""
    if on_cpu(mesh) and cpu_options_supported(program):
        return CPU_COMPILER_OPTIONS[program]
    return None


def jit_with_options(fn: Callable[..., Any], options: dict[str, str] | None) -> Callable[..., Any]:
    """``jax.jit(fn, compiler_options=options)`` that may also be called under a caller's trace.

    JAX accepts ``compiler_options`` on top-level jits only: a call inside the caller's
    own ``jax.jit`` (or a ``lax.scan`` under it) raises ValueError. The wrapper calls
    the jit with ``options`` at top level and a plain ``jax.jit(fn)`` under a trace
    (when an argument leaf is a ``jax.core.Tracer``, or, for arguments all closed over
    by the caller, when JAX refuses the options): the caller's program, compiled with
    the caller's options, then holds ``fn``, whose values may differ from the top-level
    call's by float rounding. ``.lower`` and ``.trace`` are the top-level jit's. With
    ``options`` None it is ``jax.jit(fn)`` itself.

    Args:
      fn: the function to jit.
      options: XLA compile options (:func:`compiler_options`), or None.

    Returns:
      The jitted ``fn``.
    """
    top = jax.jit(fn, compiler_options=options)
    if not options:
        return top
    nested = jax.jit(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((args, kwargs))):
            return nested(*args, **kwargs)
        try:
            return top(*args, **kwargs)
        except ValueError as e:  # concrete arguments, but under the caller's jit
            if "compiler_options" not in str(e) or "top-level" not in str(e):
                raise
            return nested(*args, **kwargs)

    call.lower = top.lower  # type: ignore[attr-defined]
    call.trace = top.trace  # type: ignore[attr-defined]
    return call


def nonfinite_rows(a: Any) -> np.ndarray | None:
    """Indices (int ``[k]``, ascending) of the rows (axis 0) of ``a`` that hold NaN or inf.

    Computed where ``a`` lies (a reduction on its devices; one boolean per row comes back
    to the host). An integer or boolean array has none. None for a tracer: under
    ``jit`` the values cannot be looked at.
    """
    if isinstance(a, jax.core.Tracer):
        return None
    if not jnp.issubdtype(jnp.result_type(a), jnp.inexact) or np.shape(a)[0] == 0:
        return np.zeros(0, np.int64)
    a = jnp.asarray(a)
    return np.flatnonzero(~np.asarray(jnp.isfinite(a).reshape(a.shape[0], -1).all(axis=1)))


def pad_rows(x: Any, multiple: int, *, zeros: bool = False) -> tuple[Any, int]:
    """Pad axis 0 of every leaf of ``x`` to a multiple of ``multiple`` by repeating row 0.

    Repeating a real row (rather than zeros) keeps padded rows finite for kernels
    such as log-likelihoods, whose values for the padding are dropped anyway.
    ``zeros=True`` pads with zeros instead, for sums over rows (:func:`sum_over_examples`).

    Returns:
      ``(padded, n)`` where ``n`` is the original number of rows.
    """
    leaves = jax.tree.leaves(x)
    if not leaves:
        raise ValueError("pad_rows needs at least one array")
    n = leaves[0].shape[0]
    pad = (-n) % multiple
    if pad == 0:
        return x, n

    def _pad(a):
        filler = jnp.zeros_like(a[:1]) if zeros else a[:1]
        return jnp.concatenate([a, jnp.broadcast_to(filler, (pad,) + a.shape[1:])], axis=0)

    return jax.tree.map(_pad, x), n


def replicate(x: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``x`` fully replicated on ``mesh``."""
    return jax.device_put(x, NamedSharding(mesh, P()))


def shard_examples(
    fn: Callable[..., Any],
    mesh: Mesh,
    sharded: Any,
    replicated: Any = (),
    *,
    axis_name: str = AXIS,
    example_axis: int = 0,
) -> Any:
    """Run a row-wise ``fn(sharded, replicated)`` with ``sharded``'s rows split over ``mesh``.

    Args:
      fn: ``fn(sharded_block, replicated) -> outputs``; each output leaf has the
        example axis at ``example_axis`` (0 or 1; 1 is for ``[models, examples]``
        matrices). Must be row-wise (see the module docstring).
      mesh: a 1-D mesh from :func:`make_mesh`.
      sharded: pytree of arrays whose axis 0 is the example axis (same length n).
      replicated: pytree of arrays every device sees in full (model states, keys).
      axis_name: the mesh axis name.
      example_axis: where the example axis is in ``fn``'s outputs.

    Returns:
      ``fn``'s outputs for all n examples, padding removed. Jit the caller (or this
      call) to get one compiled program.
    """
    if example_axis not in (0, 1):
        raise ValueError(f"example_axis must be 0 or 1, got {example_axis}")
    ndev = mesh.shape[axis_name]
    padded, n = pad_rows(sharded, ndev)
    out_spec = P(axis_name) if example_axis == 0 else P(None, axis_name)
    mapped = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(P(axis_name), P()),
        out_specs=out_spec,
        check_vma=False,
    )
    out = mapped(padded, replicated)
    if example_axis == 0:
        return jax.tree.map(lambda a: a[:n], out)
    return jax.tree.map(lambda a: a[:, :n], out)


def sum_over_examples(
    fn: Callable[[Any], Any],
    mesh: Mesh,
    sharded: Any,
    *,
    axis_name: str = AXIS,
) -> Any:
    """``sum over devices of fn(block)``, with ``sharded``'s rows split over ``mesh``.

    For reductions that are sums over examples (Gram matrices ``X^T X``, ``X^T y``,
    sufficient statistics): each device reduces its own block, the partial results are
    ``psum``-ed, and every device gets the total. Rows are padded with zeros (not with a
    repeated row as in :func:`shard_examples`), so ``fn`` must map zero rows to zero.

    Args:
      fn: ``fn(block) -> pytree`` for a block of rows (axis 0 of every leaf).
      mesh: a 1-D mesh from :func:`make_mesh`.
      sharded: pytree of arrays whose axis 0 is the example axis.
      axis_name: the mesh axis name.

    Returns:
      The summed pytree, replicated.
    """
    padded, _ = pad_rows(sharded, mesh.shape[axis_name], zeros=True)

    def local(block):
        return jax.tree.map(lambda a: jax.lax.psum(a, axis_name), fn(block))

    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(axis_name),), out_specs=P(), check_vma=False
    )(padded)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str | None = None,
) -> None:
    """Join a multi-process JAX run (``jax.distributed.initialize``), once per process.

    With no arguments JAX auto-detects the cluster (SLURM, TPU pods, ...). On CPU,
    pass ``cpu_collectives="gloo"`` to let processes exchange data over TCP (as the
    loopback tests do). Must be called before any other JAX operation.

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordinator service (an
        IPv6 host in brackets, ``"[::1]:1234"``); None to auto-detect.
      num_processes: how many processes take part, >= 1; None to auto-detect.
      process_id: this process's index, ``0 <= process_id < num_processes``; None to
        auto-detect.
      cpu_collectives: ``"gloo"`` (or another ``jax_cpu_collectives_implementation``).

    Raises:
      ValueError: before JAX is touched, when an argument given is malformed:
        ``coordinator_address`` not ``"host:port"`` (port 1..65535), ``num_processes``
        not an integer >= 1, or ``process_id`` not an integer in
        ``[0, num_processes)``.
    """
    _check_distributed_args(coordinator_address, num_processes, process_id)
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def _check_distributed_args(coordinator_address: Any, num_processes: Any, process_id: Any) -> None:
    if coordinator_address is not None:
        host, _, port = str(coordinator_address).rpartition(":")
        if (not isinstance(coordinator_address, str) or not host or not port.isdigit()
                or not 1 <= int(port) <= 65535):
            raise ValueError(f"coordinator_address must be 'host:port' (e.g. '10.0.0.1:1234'; port 1..65535), "
                             f"got {coordinator_address!r}")
    if num_processes is not None:
        _check_int("num_processes", num_processes, 1)
    if process_id is not None:
        pid = _check_int("process_id", process_id)
        if num_processes is not None and pid >= num_processes:
            raise ValueError(f"process_id must be in [0, num_processes) = [0, {num_processes}), got {process_id!r}")


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where
    the platform has none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _forced_cpu_devices() -> int | None:
    """The CPU device count ``--xla_force_host_platform_device_count`` in XLA_FLAGS asks for, or None.

    JAX starts that many CPU devices unless the ``jax_num_cpu_devices`` option (read first)
    is set too."""
    found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else None


def _more_devices_advice(wanted: int) -> str:
    """How a process with fewer than ``wanted`` devices gets ``wanted``, for error messages.

    Names what decided the count: ``--xla_force_host_platform_device_count`` in
    ``XLA_FLAGS`` (it wins over :func:`use_cpu_devices` and ``jaxmem run --devices``),
    the ``JAX_NUM_CPU_DEVICES`` variable, JAX's default of one CPU device (which
    :func:`use_cpu_devices` changes only before JAX starts), or an accelerator (where
    ``JAX_PLATFORMS=cpu`` runs on CPU devices instead, e.g. to continue a run trained on
    a CPU host).
    """
    devices = jax.devices()
    have, platform = len(devices), devices[0].platform
    setup = (f"call jaxmem.use_cpu_devices({wanted}) right after the imports, before any JAX operation "
             f"(`jaxmem run --devices {wanted}` does)")
    if platform != "cpu":
        return (f"this process runs on {have} {platform.upper()} device(s); to run on {wanted} CPU devices instead "
                f"(e.g. to continue a run trained on a CPU host), set JAX_PLATFORMS=cpu in the environment and {setup}")
    forced = _forced_cpu_devices()
    configured = int(jax.config.jax_num_cpu_devices)
    if forced is not None and configured < 1:  # JAX reads the option first, the flag where it is unset
        return (f"XLA_FLAGS=--xla_force_host_platform_device_count={forced} gives JAX {forced} CPU device(s) and "
                f"wins over jaxmem.use_cpu_devices and `jaxmem run --devices`: unset XLA_FLAGS, or set its count "
                f"to {wanted}, before starting Python")
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return (f"JAX_NUM_CPU_DEVICES={os.environ['JAX_NUM_CPU_DEVICES']} gives JAX {have} CPU device(s): "
                f"set it to {wanted} (or unset it and {setup})")
    return f"JAX runs {have} CPU device(s): {setup}"


def use_cpu_devices(count: int | None = None, *, at_most: int | None = None) -> int:
    """Give JAX's CPU backend ``count`` devices (default: one per core), before JAX starts.

    A CPU is one JAX device by default, and XLA splits each matrix product of a program
    over the cores. jaxmem's kernels are sharded over devices (examples in
    :func:`shard_examples`, ensemble members in :func:`jaxmem.ensemble.make`), so with one
    CPU device per core each core runs its own shard, and no product waits for the
    other cores: on a 2-core AMD EPYC the likelihood kernel of the paper's MNIST VAE
    scored 2-13% more pairs per second (four comparisons), the paper's MNIST VAE
    ensemble trained at 56-61% of the matmul peak against 45-57% on one device, and
    ``jaxmem run``'s default run took 20-30% less time (``benchmarks/RESULTS.md``).
    ``jaxmem run`` calls this with one device per core (at most one per model); call it
    yourself before any other JAX operation (right after the imports) to do the same
    from Python.

    Scores agree across device counts to float rounding, not bitwise: after many epochs
    training's rounding differences show in the scores (``jaxmem run``'s default: M of
    the two layouts correlate at 0.98), so keep the count fixed to reproduce a run.
    Data that every device needs (the training set) is held once per device.

    Left unchanged, returning the count JAX runs or will start: once JAX has started
    (the devices it runs; asking for another ``count`` then raises), when
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` is set (it wins over
    ``count``; JAX starts that many devices, or, when the ``jax_num_cpu_devices`` option
    or the ``JAX_NUM_CPU_DEVICES`` environment variable is set too, the option's number:
    JAX reads the option first), and with ``count=None`` when the ``jax_num_cpu_devices``
    option (or ``JAX_NUM_CPU_DEVICES``) already sets it. Only the CPU backend
    is affected: on accelerator hosts jaxmem's kernels run on the accelerators whatever
    this says.

    Args:
      count: CPU devices to create (a positive int), or None for :func:`cpu_cores`.
      at_most: with ``count=None``, a cap on the default (``jaxmem run`` passes its
        number of models: more devices than models would only hold padding while
        training).

    Returns:
      The number of CPU devices this process has (or will have when JAX starts).

    Raises:
      ValueError: ``count`` or ``at_most`` is not a positive integer.
      RuntimeError: JAX has already started with another number of CPU devices, and
        ``count`` asked for a specific one.
    """
    for name, value in (("count", count), ("at_most", at_most)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if _jax_started():  # what runs now, whatever XLA_FLAGS or the option say since
        return _started_cpu_devices(count)
    forced = _forced_cpu_devices()
    configured = int(jax.config.jax_num_cpu_devices)
    if forced is not None:  # JAX starts the option's count where both are set, the flag's otherwise
        return configured if configured >= 1 else forced
    if count is None and configured >= 1:
        return configured
    want = int(count) if count is not None else min(cpu_cores(), at_most) if at_most else cpu_cores()
    try:
        jax.config.update("jax_num_cpu_devices", want)
    except RuntimeError:  # JAX's backends are already initialised (a JAX without _jax_started)
        return _started_cpu_devices(count)
    return want


def _jax_started() -> bool:
    """Whether JAX's backends are initialised (False where this JAX cannot tell)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def _started_cpu_devices(count: int | None) -> int:
    """The CPU devices of a started JAX; an error if ``count`` asked for another number."""
    have = len(jax.devices("cpu"))
    if count is not None and have != count:
        raise RuntimeError(
            f"use_cpu_devices({count}) must be called before any JAX operation: JAX has "
            f"already started with {have} CPU device(s)"
        )
    return have


def host_local_rows(n: int) -> np.ndarray:
    """Indices of the rows of an ``n``-row array that this process feeds in a multi-host run.

    Contiguous blocks, process ``p`` of ``P`` getting ``[p*ceil(n/P), (p+1)*ceil(n/P))``
    (empty for the processes past the end, e.g. all of them when ``n`` is 0).

    Raises:
      ValueError: ``n`` is not an integer >= 0.
    """
    n = _check_int("n", n)
    nproc, pid = jax.process_count(), jax.process_index()
    block = -(-n // nproc)
    return np.arange(pid * block, min(n, (pid + 1) * block))
