"""The ``jaxmem`` command: memorization scores end to end, reports, and the linear baseline.

::

    jaxmem run                  # the embedded digits, default model, results in ./jaxmem_results
    jaxmem run --data mnist --data-dir ~/tensorflow_datasets --folds 10 --repeats 10
    jaxmem report DIR           # figures + summary of a saved result, again
    jaxmem leverage FILE.csv --target y

``run`` trains one model per member of a K-fold plan, evaluates every example's
importance-weighted log-likelihood under every member, scores the leave-one-out
density ratio (van den Burg & Williams, 2021) and writes a results directory
(``scores.csv``, ``result.npz``, figures, ``summary.md``). Running it again on the same
directory resumes from the training checkpoints; another configuration there is refused.

Expected failures (a missing or malformed file, an unknown data set, too few examples
for the folds, a results directory of another run, ...) print one line
``jaxmem: error: ...`` on stderr and exit with status 2; an interrupted run exits with
status 130 and keeps its checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import pathlib
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

__all__ = ["main", "build_parser"]

_PROG = "jaxmem"
_EXIT_ERROR = 2
_EXIT_INTERRUPTED = 130
_MODELS = ("mlp_vae", "conv_vae", "linear_gaussian_vae", "classifier")
# Hidden sizes of the MLP VAE for small inputs (8x8 digits: 64 pixels). The model's own
# default (1024, 512, 256) is the paper's MNIST setting and overfits 1,797 digits wildly.
_SMALL_INPUT = 256
_SMALL_HIDDEN = (256, 128)
_SMALL_LATENT = 8
# The paper's preprocessing: 28x28 MNIST-like images zero-padded to 32x32.
_PAD_TO = {"mnist": 32, "fashion_mnist": 32, "binarized_mnist": 32}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr like every other error."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see `{self.prog} --help`)")


def _fail(message: Any) -> NoReturn:
    # One line: a list after "...:" on lines of its own reads "...: a; b".
    text = " ".join(str(message).replace(":\n", ": ").replace("\n", "; ").split())
    print(f"{_PROG}: error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(_EXIT_ERROR)


def _info(message: str) -> None:
    print(f"{_PROG}: {message}", file=sys.stderr, flush=True)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """jaxmem's own warnings as one ``jaxmem: warning: ...`` line (not Python's
    ``path:line: UserWarning:`` and a source line); other packages' as Python shows them."""
    if getattr(message, "jaxmem", False) or os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
        _info(f"warning: {message}")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


# ----------------------------------------------------------------------------- parsing


def _int_list(text: str) -> tuple[int, ...]:
    items = text.replace(" ", "").split(",")
    if "" in items:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r} (an empty item)")
    try:
        values = tuple(int(v) for v in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``, else "expected {what}, got ..."."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "a non-negative integer")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return v


def _track_epochs(text: str) -> str | tuple[int, ...]:
    if text in ("auto", "none"):
        return text
    return _int_list(text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except None: an option without a value says what it does in its help
    (``--latent``: "8 for the MLP VAE on small inputs, else the model's"), not "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jaxmem`` command (subcommands run, report, leverage)."""
    fmt = _HelpFormatter
    parser = _Parser(
        prog=_PROG, formatter_class=fmt,
        description="How much does a model memorize each training example? Leave-one-out "
                    "density ratios (van den Burg & Williams, NeurIPS 2021) in JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{run,report,leverage}", parser_class=_Parser)

    run = sub.add_parser(
        "run", formatter_class=fmt, help="compute memorization scores and write a results directory",
        description="Train a K-fold ensemble, score every example's memorization M = U - V "
                    "(nats) and write scores, figures and a summary. With no options: the "
                    "embedded 1,797 handwritten 8x8 digits, an MLP VAE, 10 folds x 2 repeats. Rerunning "
                    "on the same --out resumes from its checkpoints.",
    )
    g = run.add_argument_group("data")
    g.add_argument("--data", default="digits",
                   help="data set name (digits, mnist, fashion_mnist, binarized_mnist, cifar10, "
                        "celeb_a) or a .npy/.npz/.csv file")
    g.add_argument("--data-dir", default=None,
                   help="TFDS data directory with prepared array_record files")
    g.add_argument("--limit", type=_positive_int, default=None,
                   help="use only the first LIMIT examples (default: all)")
    g.add_argument("--binarize", choices=("dynamic", "static", "none"), default="dynamic",
                   help="binarization for the MLP VAE's Bernoulli pixels: a fresh draw per "
                        "look (dynamic), one draw when loading (static), or none")
    g = run.add_argument_group("model")
    g.add_argument("--model", choices=_MODELS, default="mlp_vae", help="model of every member")
    g.add_argument("--hidden", type=_int_list, default=None,
                   help="hidden sizes, e.g. 256,128 (conv_vae: channels). Default for the MLP "
                        f"VAE: {','.join(map(str, _SMALL_HIDDEN))} for inputs of at most "
                        f"{_SMALL_INPUT} values (8x8 digits), else the paper's 1024,512,256")
    g.add_argument("--latent", type=_positive_int, default=None,
                   help=f"latent dimension (default: {_SMALL_LATENT} for the MLP VAE on small "
                        "inputs, else the model's)")
    g = run.add_argument_group("ensemble and training")
    g.add_argument("--folds", type=_positive_int, default=10, help="K of the K-fold plan")
    g.add_argument("--repeats", type=_positive_int, default=2,
                   help="independent K-fold splits (the paper: 10); 2 or more give every "
                        "example several held-out models, hence a standard error of M")
    g.add_argument("--epochs", type=_positive_int, default=100, help="training epochs of every model")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="examples per step")
    g.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    g.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of everything random")
    g.add_argument("--full-model", action="store_true",
                   help="also train a model on all examples and report log p under it")
    g.add_argument("--checkpoint-every", type=_positive_int, default=5,
                   help="epochs between training checkpoints")
    g.add_argument("--devices", type=_positive_int, default=None,
                   help="number of devices to split models and examples over (default: all; "
                        "a CPU host gets one device per core, at most one per model, and "
                        "--devices N gives it N; scores agree across counts to float rounding, "
                        "so a run resumes only on the count it was trained on)")
    g = run.add_argument_group("scoring")
    g.add_argument("--samples", type=_positive_int, default=128,
                   help="importance samples per log-likelihood (the paper: 256 on MNIST)")
    g.add_argument("--preprocess-draws", type=_positive_int, default=1,
                   help="draws of the model's random preprocessing (dynamic binarization, "
                        "dequantization) over which each log-likelihood is averaged: with one, M "
                        "is the score of one seeded binarization of each example, whose spread "
                        "over draws the stderr leaves out; B draws shrink it by sqrt(B), for B "
                        "times the scoring time")
    g.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="matmul inputs of the log-likelihoods: bfloat16 scores MLP models faster "
                        "on hardware that multiplies bf16 (accelerators, CPUs with AMX; slower on "
                        "CPUs without, which warn) at a rounding far below the Monte Carlo error "
                        "(the project's benchmarks/RESULTS.md); training stays float32")
    g.add_argument("--quantile", type=float, default=0.95,
                   help="'highly memorized' means M above this quantile")
    g.add_argument("--track-epochs", type=_track_epochs, default="auto",
                   help="epochs after which M is also computed, e.g. 10,20,50; 'auto': 5 "
                        "evenly spaced epochs (when training for at least 5); 'none'")
    g.add_argument("--track-samples", type=_positive_int, default=None,
                   help="importance samples of the scores over epochs (default: --samples, "
                        "so that the last tracked epoch equals the final scores)")
    g = run.add_argument_group("output")
    g.add_argument("--out", default="jaxmem_results", help="results directory")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    rep = sub.add_parser(
        "report", formatter_class=fmt, help="regenerate the figures and summary of a results directory",
        description="Regenerate every figure and summary.md from DIR/result.npz. The example "
                    "grid is redrawn from the run's images, reloaded (TFDS data: pass --data-dir "
                    "again); when they cannot be, the grid the run drew is kept.",
    )
    rep.add_argument("directory", metavar="DIR", help="a results directory of `jaxmem run`")
    rep.add_argument("--data-dir", default=None,
                     help="TFDS data directory of the run, to reload images for the example grid")
    rep.set_defaults(func=_cmd_report)

    lev = sub.add_parser(
        "leverage", formatter_class=fmt,
        help="linear baseline of a table: leverage, residuals, Cook's distance, LOO density ratio",
        description="The linear baseline on a CSV/npz/npy table: hat-matrix leverage of [1, X]; "
                    "with --target, OLS of the target on the other columns with studentized "
                    "residuals, Cook's distance, DFFITS and the closed-form leave-one-out log "
                    "density ratio of Gaussian regression; without, the closed-form ratio of a "
                    "Gaussian fitted to the rows. All in float64 by thin QR, no refits.",
    )
    lev.add_argument("file", metavar="FILE", help=".csv (optional header), .npz (array x, optional y) or .npy")
    lev.add_argument("--target", default=None,
                     help="target column: a CSV header name or a 0-based column index "
                          "(npz: 'y' for its y array)")
    lev.add_argument("--out", default="jaxmem_leverage", help="output directory")
    lev.add_argument("--top", type=_positive_int, default=10, help="rows printed")
    lev.set_defaults(func=_cmd_leverage)
    return parser


# -------------------------------------------------------------------------------- run


def _model_options(args: argparse.Namespace, example_shape: tuple[int, ...],
                   num_classes: int | None) -> dict[str, Any]:
    size = 1
    for s in example_shape:
        size *= s
    opts: dict[str, Any] = {}
    if args.model == "mlp_vae":
        small = size <= _SMALL_INPUT
        hidden = args.hidden or (_SMALL_HIDDEN if small else None)
        latent = args.latent or (_SMALL_LATENT if small else None)
        if hidden is not None:
            opts["hidden"] = list(hidden)
        if latent is not None:
            opts["latent_dim"] = latent
        opts["binarize"] = "dynamic" if args.binarize == "dynamic" else "none"
    elif args.model == "conv_vae":
        if args.hidden:
            opts["channels"] = list(args.hidden)
        if args.latent:
            opts["latent_dim"] = args.latent
    elif args.model == "linear_gaussian_vae":
        if args.hidden:
            raise ValueError("--hidden does not apply to linear_gaussian_vae (it has no hidden layers)")
        if len(example_shape) != 1:
            raise ValueError(
                f"linear_gaussian_vae needs flat examples [n, d]; this data set's examples have "
                f"shape {example_shape}"
            )
        if args.latent:
            opts["latent_dim"] = args.latent
    else:  # classifier
        if num_classes is None:
            raise ValueError("--model classifier needs labels, and this data set has none")
        opts["num_classes"] = num_classes
        if args.hidden:
            opts["hidden"] = list(args.hidden)
        if args.latent:
            raise ValueError("--latent does not apply to the classifier")
    return opts


def _tracked(spec: str | tuple[int, ...], epochs: int) -> tuple[int, ...]:
    if spec == "none":
        return ()
    if spec == "auto":
        if epochs < 5:
            return ()
        return tuple(sorted({round(epochs * j / 5) for j in range(1, 6)}))
    bad = [e for e in spec if e > epochs]
    if bad:
        raise ValueError(f"--track-epochs {bad} exceed --epochs {epochs}")
    return tuple(spec)


def _data_spec(args: argparse.Namespace) -> dict[str, Any]:
    """How to load the data again (for `jaxmem report`), as recorded in config.json.

    A resumed run whose data are loaded otherwise (another limit, binarization or
    padding) is refused by the results directory's configuration check.
    """
    from jaxmem.data import KNOWN_DATASETS

    source = args.data
    path = pathlib.Path(source).expanduser()
    if source not in KNOWN_DATASETS and (path.suffix.lower() in (".npy", ".npz", ".csv") or path.exists()):
        source = str(path.resolve())  # `jaxmem report` may run from another directory
    binarize = None
    if args.model == "mlp_vae":
        binarize = {"dynamic": "dynamic", "static": "static", "none": None}[args.binarize]
    return {"source": source, "limit": args.limit, "binarize": binarize, "pad_to": _PAD_TO.get(source)}


def _load(spec: dict[str, Any], *, seed: int, data_dir: str | None):
    from jaxmem.data import load_dataset

    # Configurations written before "pad_to" was recorded loaded nothing padded.
    return load_dataset(spec["source"], limit=spec["limit"], binarize=spec["binarize"],
                        pad_to=spec.get("pad_to"), seed=seed, data_dir=data_dir)


def _fingerprint(x) -> str:
    from jaxmem.checkpoint import fingerprint_array

    return fingerprint_array(x)


class _Interrupts:
    """Ctrl-C and SIGTERM during a run.

    While training, the first signal asks to stop at the next epoch that is checkpointed:
    an exception raised inside orbax's asynchronous save leaves its threads half done,
    whereas one raised between epochs lets the training loop finish the save it started.
    A second signal, or a signal in any other stage, stops at once (earlier checkpoints
    are complete on disk either way).
    """

    def __init__(self, checkpoint_every: int, epochs: int):
        self.every, self.epochs = checkpoint_every, epochs
        self.training = False
        self.pending = False
        self.done = 0  # epochs trained (set from the checkpoint a run resumes from)
        self.previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.training and not self.pending:
            self.pending = True
            target = min(self.epochs, (self.done // self.every + 1) * self.every)
            got, again = ("Ctrl-C", "press Ctrl-C again") if signum == signal.SIGINT else \
                (signal.Signals(signum).name, f"send {signal.Signals(signum).name} again")
            _info(f"{got}: stopping after the checkpoint of epoch {target} (and its scores, if the epoch is "
                  f"tracked); {again} to stop now")
            return
        raise KeyboardInterrupt

    def on_stage(self, stage: str) -> None:
        self.training = stage == "train"

    def on_epoch(self, epoch: int) -> None:
        self.done = epoch
        if self.pending and (epoch % self.every == 0 or epoch == self.epochs):
            raise KeyboardInterrupt


def _cmd_run(args: argparse.Namespace) -> int:
    if not 0.0 < args.quantile < 1.0:
        raise ValueError(f"--quantile must be strictly between 0 and 1, got {args.quantile}")
    if args.folds < 2:
        raise ValueError(f"--folds must be at least 2 (each example needs a model that holds it out), got {args.folds}")
    if args.limit is not None and args.limit < args.folds:
        raise ValueError(f"--folds {args.folds} needs at least {args.folds} examples; "
                         f"--limit {args.limit} keeps only {args.limit}")
    tracked = _tracked(args.track_epochs, args.epochs)
    members = args.folds * args.repeats + int(args.full_model)
    # Before anything starts JAX: on a CPU host, one device per core (at most one per
    # model), so that each core runs its own shard of the kernels (mesh.use_cpu_devices).
    from jaxmem.mesh import use_cpu_devices

    try:
        use_cpu_devices(args.devices, at_most=members)
    except RuntimeError:  # JAX already started in this process (main() called from Python):
        pass  # --devices N then takes N of its devices (make_mesh says if there are fewer)
    spec = _data_spec(args)
    ds = _load(spec, seed=args.seed, data_dir=args.data_dir)
    n = len(ds)
    if n < args.folds:
        raise ValueError(f"--folds {args.folds} needs at least {args.folds} examples; "
                         f"{ds.name} has {n}")
    options = _model_options(args, ds.example_shape, ds.metadata.get("num_classes"))
    if args.model == "classifier":
        # One output per label value up to the largest: ids as labels (0..9 and 2e9) would
        # build a softmax of 2e9 outputs (127 GiB per member), an out-of-memory kill.
        import numpy as np

        used = len(np.unique(ds.y))
        if options["num_classes"] > max(2 * used, 1000):
            raise ValueError(
                f"the labels reach {options['num_classes'] - 1} but take only {used} distinct values: the "
                f"classifier would have {options['num_classes']} outputs; number the classes 0..{used - 1} "
                "(np.unique(y, return_inverse=True)[1]) and save the file again")
    levels = ds.metadata.get("levels")
    if args.model == "conv_vae" and levels != 256:
        _info(f"warning: conv_vae dequantizes pixels as 8-bit values ((round(255 x) + u) / 256) and "
              f"{ds.name} has " + (f"{levels} intensity levels" if levels else "real values")
              + ": its log p is a density on that 256-level grid, not on the data's own values")

    from jaxmem.checkpoint import run_lock
    from jaxmem.pipeline import _check_out_dir, _holds_saved_result, _latest_checkpoint, memorization
    from jaxmem.report import _drawable, write_report

    # What the report can draw is decided now, not after training.
    grid = ds if _drawable(ds.x) else None
    if grid is None and ds.x.ndim > 2:
        _info(f"note: no example grid: examples of shape {ds.example_shape} are not images "
              "[height, width] or [height, width, channels] with 1, 3 or 4 channels")

    mesh = None
    if args.devices is not None:
        import jax

        from jaxmem.mesh import _more_devices_advice, make_mesh

        have = len(jax.devices())
        if have < args.devices:  # XLA_FLAGS, an accelerator or a JAX started before decided the count
            raise ValueError(f"--devices {args.devices}: this process has {have} device(s); "
                             f"{_more_devices_advice(args.devices)}")
        mesh = make_mesh(args.devices)
    out = os.path.expanduser(args.out)  # `--out=~/x` reaches us unexpanded
    shown_options = dict(options)
    if ds.metadata.get("binarization") == "static":  # drawn when loading; the model keeps the pixels
        shown_options["binarize"] = "static"
    shown = ", ".join(f"{k}={v}" for k, v in shown_options.items())
    plan_models = args.folds * args.repeats
    models = f"{plan_models} models" + (f" + 1 full model = {members} models" if args.full_model else "")
    scored = (f"log p(y|x) of {n} examples under every model (exact)" if args.model == "classifier" else
              f"log-likelihood of {n} examples under every model ({args.samples} importance samples"
              + (f", {args.preprocess_draws} draws of the preprocessing" if args.preprocess_draws > 1 else "") + ")")
    stages = {
        "train": f"training {members} models (progress in model-epochs)",
        "likelihood": scored,
        "scores": "memorization scores",
    }
    started = time.perf_counter()
    interrupts = _Interrupts(args.checkpoint_every, args.epochs)

    def on_stage(stage: str) -> None:
        interrupts.on_stage(stage)
        if stage == "train":  # the results directory has accepted the configuration
            import jax

            from jaxmem.ensemble import default_mesh

            devices = jax.devices()[: args.devices or None]
            # Training splits the models over as few devices as give the same load per device.
            training = args.devices or default_mesh(members).size
            on = f"{len(devices)} {devices[0].platform.upper()} device(s)" + (
                f" ({training} for training)" if training != len(devices) else "")
            _info(f"{ds.name}: {n} examples of shape {ds.example_shape}; {args.model}{f' ({shown})' if shown else ''}; "
                  f"{args.folds} folds x {args.repeats} repeat(s) = {models} x "
                  f"{args.epochs} epochs; {on}")
            latest = _latest_checkpoint(out)
            interrupts.done = latest or 0
            if latest is not None and latest >= args.epochs:
                _info(f"all {args.epochs} epochs are checkpointed in {out}: scoring again" + (
                    f" (its saved result is replaced; `{_PROG} report {shlex.quote(out)}` redraws the figures "
                    "without scoring)" if _holds_saved_result(out) else ""))
            elif latest is not None:
                _info(f"resuming from the checkpoint of epoch {latest} in {out}")
        _info(stages.get(stage, stage))

    _check_out_dir(out)  # before the lock, which creates the folder
    # Held from training to the last figure: a second run in the same folder is refused
    # until this one's report is written (memorization takes the same lock again).
    with interrupts, run_lock(out, "out_dir"):
        result = memorization(
            ds.x, ds.y, model=args.model, model_options=options, folds=args.folds,
            repeats=args.repeats, epochs=args.epochs, batch_size=args.batch_size,
            learning_rate=args.lr, num_samples=args.samples, preprocess_draws=args.preprocess_draws,
            matmul_dtype=args.matmul_dtype, seed=args.seed,
            quantile=args.quantile, full_model=args.full_model, track_epochs=tracked,
            track_samples=args.track_samples, out_dir=out,
            data_info={"name": ds.name, **spec, "sha256": _fingerprint(ds.x)},
            progress=not args.no_progress, mesh=mesh, checkpoint_every=args.checkpoint_every,
            on_stage=on_stage, on_epoch=interrupts.on_epoch,
        )
        report = write_report(result, out, dataset=grid)
    elapsed = time.perf_counter() - started
    print(report["markdown"], end="")
    print(f"\nResults in {os.path.abspath(out)} ({elapsed:.0f} s): scores.csv, result.npz, "
          + ", ".join(p.name for p in report["files"].values()))
    return 0


# ------------------------------------------------------------------------------ report


def _cmd_report(args: argparse.Namespace) -> int:
    from jaxmem.checkpoint import run_lock

    directory = os.path.expanduser(args.directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"results directory not found: {directory}")
    with run_lock(directory, "results directory"):  # not while a run writes it
        return _report(args, directory)


def _report(args: argparse.Namespace, directory: str) -> int:
    from jaxmem.data import KNOWN_DATASETS
    from jaxmem.pipeline import load_result
    from jaxmem.report import _drawable_shape, write_report

    result = load_result(directory)
    data = result.config.get("data", {})
    ds = None
    missing = None  # why the scored images are not at hand
    drawable = _drawable_shape(data.get("example_shape", ()))
    if drawable and "source" not in data:
        # memorization(out_dir=...) from Python records no source: a grid drawn there
        # (write_report(result, DIR, x)) is kept, not deleted.
        missing = "the run recorded no data source to reload its images from"
    elif drawable:
        seed = int(result.config.get("training", {}).get("seed", 0))
        try:
            ds = _load(data, seed=seed, data_dir=args.data_dir)
        except (ValueError, FileNotFoundError) as err:
            missing = f"the images could not be reloaded ({err})"
        if ds is not None and data.get("sha256") and _fingerprint(ds.x) != data["sha256"]:
            missing = f"{data['source']} no longer holds the scored images"
            ds = None
    # The grid drawn by the run is kept (config.json does not record --data-dir, so that a
    # moved data folder does not block a resume): only a grid of other scores is deleted.
    report = write_report(result, directory, dataset=ds, keep_examples=missing is not None)
    if missing is not None:
        source = data.get("source")
        if source is None:
            hint = "draw it from Python: jaxmem.write_report(jaxmem.load_result(DIR), DIR, x)"
        elif source in KNOWN_DATASETS:
            hint = (f"pass the TFDS data folder the run read: `jaxmem report {shlex.quote(directory)} "
                    "--data-dir FOLDER`")
        else:
            hint = f"put the run's data back at {source} and run `jaxmem report {shlex.quote(directory)}` again"
        kept = report["kept"].get("examples")
        if kept is not None:
            _info(f"note: {kept.name} is kept from the run: {missing}; to redraw it, {hint}")
        else:
            _info(f"note: no example grid: {missing}; to draw it, {hint}")
    print(report["markdown"], end="")
    print(f"\nWrote {', '.join(p.name for p in report['files'].values())} in {os.path.abspath(directory)}")
    return 0


# ---------------------------------------------------------------------------- leverage


def _read_table(path: pathlib.Path, target: str | None):
    """``(X [n, p] float64, y [n] or None, column names, target name)`` from a table file."""
    import numpy as np

    from jaxmem.data import read_table

    table, names, y = read_table(path)
    suffix = path.suffix.lower()
    position = list(range(len(names)))  # of X's columns in the file

    target_name = None
    if target is not None:
        if suffix == ".npz" and target == "y":
            if y is None:
                raise ValueError(f"{path} has no array named 'y' for --target y")
            y = np.asarray(y, np.float64)
            if y.shape != (len(table),):
                raise ValueError(f"{path}: y must have shape ({len(table)},), got {y.shape}")
            target_name = "y"
        else:
            named = [j for j, c in enumerate(names) if c == target]
            index = None
            if target.lstrip("-").isdigit() and -len(names) <= int(target) < len(names):
                index = int(target) % len(names)
            if len(named) > 1:
                raise ValueError(f"--target {target!r} is ambiguous: {path} has {len(named)} columns named "
                                 f"{target!r} (0-based columns {', '.join(map(str, named))}); rename them or "
                                 f"give the target's 0-based index")
            if named and index is not None and index != named[0]:
                raise ValueError(f"--target {target!r} is ambiguous: it names column {named[0]} of {path} and is "
                                 f"the 0-based index of column {names[index]!r}; rename that header or give "
                                 f"the target's 0-based index")
            if named or index is not None:
                col = named[0] if named else index
            else:
                raise ValueError(f"--target {target!r} is not a column of {path} "
                                 f"(columns: {', '.join(names[:20])})")
            y, target_name = table[:, col], names[col]
            table = np.delete(table, col, axis=1)
            del names[col], position[col]
        if table.shape[1] == 0:
            raise ValueError(f"{path}: no columns left besides the target {target_name!r}")
    else:
        y = None
    for what, arr, cols in (("X", table, names), ("target", None if y is None else y[:, None], [target_name])):
        if arr is None:
            continue
        bad = np.argwhere(~np.isfinite(arr))
        if bad.size:
            r, c = (int(v) for v in bad[0])
            where = f"column {cols[c]!r}"
            if what == "X" and cols.count(cols[c]) > 1:  # a duplicated header name
                where += f" (0-based column {position[c]} of the file)"
            raise ValueError(f"{path}: {len(bad)} NaN or inf value(s); the first is in row {r}, {where}")
    return table, y, names, target_name


def _redundant_columns(design: Any, full: int | None = None) -> list[int]:
    """Columns of ``design`` (after its intercept, column 0) that lie in the span of the
    others: removing one leaves the numerical rank unchanged, the rank being the one the fit
    itself finds (jaxmem.linear's float64 QR: its equilibration and its cut; ``full``, the
    design's rank if already known). Empty for a full-rank design."""
    import numpy as np

    from jaxmem.linear import _qr_rank

    full = _qr_rank(design) if full is None else full
    if full == design.shape[1]:
        return []
    return [j for j in range(1, design.shape[1]) if _qr_rank(np.delete(design, j, axis=1)) == full]


@contextlib.contextmanager
def _quiet_rank_cut(redundant: list[int] | bool) -> Iterator[None]:
    """jaxmem.linear's rank warning silenced where the command names the redundant columns
    itself (the warning's advice is for Python callers: dtype and method options)."""
    with warnings.catch_warnings():
        if redundant:
            warnings.filterwarnings("ignore", message="X has numerical rank")
        yield


def _cmd_leverage(args: argparse.Namespace) -> int:
    import numpy as np

    from jaxmem import linear
    from jaxmem.linear import _qr_rank
    from jaxmem.report import plot_influence, plot_memorization_vs_leverage, spearman_correlation

    path = pathlib.Path(args.file)
    X, y, names, target = _read_table(path, args.target)
    n, p = X.shape
    design = np.concatenate([np.ones((n, 1)), X], axis=1)
    # The rank the fit itself finds (jaxmem.linear's float64 QR and cut): regression needs
    # n >= rank + 2 (leaving a row out keeps a residual degree of freedom); leverage takes
    # any n (every row's is 1 when n <= rank), and the Gaussian ratio's own row need is a note.
    rank = _qr_rank(design)
    if y is not None and n < rank + 2:
        raise ValueError(f"{path}: {n} rows for {p} column(s) (+ intercept) of rank {rank}: the regression "
                         f"on --target {target!r} needs at least rank + 2 = {rank + 2} rows (one row left out, "
                         "its fit must keep a residual degree of freedom)")
    # float64 and thin QR throughout: error ~ eps * kappa rather than the Cholesky path's
    # eps * kappa^2, which a column with a large mean against its spread (e.g. a Unix
    # timestamp, kappa ~ 1e7 with the intercept) makes visible even in float64. At table
    # sizes the QR costs nothing noticeable.
    opts = {"dtype": np.float64, "method": "qr"}
    wide = n <= rank  # too few rows, not redundant columns: every row's leverage is 1
    redundant = [] if wide else _redundant_columns(design, rank)
    with _quiet_rank_cut(redundant or wide):
        if y is not None:  # before creating --out, which a refused target would leave empty
            try:
                inf = linear.influence(design, y, **opts)
            except ValueError as err:
                raise ValueError(f"{path}: --target {target!r}: {err}") from None
            ratio = linear.loo_log_density_ratio_regression(design, y, **opts)
        else:
            h = np.asarray(linear.leverage(design, **opts))
    if wide:
        _info(f"note: {n} row(s) for {p} column(s) + intercept: the rows span no more than the columns, so "
              "every row's leverage is 1 (each row alone decides a direction of the fit)")
    if redundant:
        cut = ", ".join(repr(names[j - 1]) for j in redundant)
        _info(f"note: column(s) {cut} are linear combinations of the other columns and the intercept "
              "(all zero, constant, or collinear); the fit keeps the rank of the table, so leverage, "
              "residuals, studentized residuals, Cook's distance and DFFITS are those of the table without "
              "the redundant one(s): drop one of each dependent set to silence this")
    out = pathlib.Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    cols: dict[str, np.ndarray] = {"index": np.arange(n)}
    notes = []
    if y is not None:
        cols.update(
            leverage=np.asarray(inf.leverage), residual=np.asarray(inf.residuals),
            studentized_residual=np.asarray(inf.studentized_external),
            cooks_distance=np.asarray(inf.cooks_distance), dffits=np.asarray(inf.dffits),
            loo_log_density_ratio=np.asarray(ratio.score),
        )
        undefined = np.asarray(inf.undefined)
        sort_key, sort_name = np.nan_to_num(cols["cooks_distance"], nan=np.inf), "Cook's distance"
        keep = ~undefined
        figure = plot_influence(cols["leverage"][keep], cols["studentized_residual"][keep],
                                cols["cooks_distance"][keep], out / "influence.png",
                                num_params=int(inf.rank), index=np.flatnonzero(keep))
        what = (f"OLS of {target!r} on {p} column(s) + intercept (rank {int(inf.rank)}); "
                "loo_log_density_ratio: Gaussian regression, plug-in ML variance (nats)")
        if undefined.any():
            notes.append(f"{int(undefined.sum())} row(s) with leverage 1 have undefined LOO "
                         "quantities (NaN) and are left out of the figure")
    else:
        cols["leverage"] = h
        what = f"leverage of [1, X], {p} column(s)"
        try:
            with _quiet_rank_cut(redundant or wide):
                ratio = linear.loo_log_density_ratio_gaussian(X, **opts)
        except ValueError as err:
            notes.append(f"no Gaussian LOO density ratio: {err}")
            ratio = None
        if ratio is not None:
            cols["loo_log_density_ratio"] = np.asarray(ratio.score)
            what += "; loo_log_density_ratio: Gaussian fitted to the rows by ML (nats)"
        sort_key, sort_name = h, "leverage"
        figure = None
        if ratio is not None:
            undefined = np.asarray(ratio.undefined)
            keep = ~undefined & np.isfinite(cols["loo_log_density_ratio"])
            if undefined.any():
                notes.append(f"{int(undefined.sum())} row(s) with leverage 1 have an undefined LOO "
                             "density ratio (NaN) and are left out of the figure")
            if keep.sum() >= 2:
                figure = plot_memorization_vs_leverage(cols["loo_log_density_ratio"][keep], h[keep],
                                                       out / "loo_ratio_vs_leverage.png")

    def write_csv(f) -> None:
        w = csv.writer(f)
        w.writerow(list(cols))
        for i in range(n):
            w.writerow([str(i)] + [f"{cols[c][i]:.8g}" for c in list(cols)[1:]])

    from jaxmem.checkpoint import _write_atomically

    csv_path = out / "leverage.csv"
    _write_atomically(csv_path, write_csv)  # whole or not at all

    print(f"{path.name}: {n} rows; {what}")
    for note in notes:
        print(f"note: {note}")
    order = np.argsort(-sort_key, kind="stable")[: args.top]
    print(f"\nTop {len(order)} rows by {sort_name}:")
    header = list(cols)
    print("  ".join(f"{c:>{max(8, len(c))}}" for c in header))
    for i in order:
        cells = [f"{i:>{max(8, len('index'))}d}"]
        cells += [f"{cols[c][i]:>{max(8, len(c))}.4g}" for c in header[1:]]
        print("  ".join(cells))
    if "loo_log_density_ratio" in cols:
        m = cols["loo_log_density_ratio"]
        ok = np.isfinite(m)
        if ok.sum() >= 2:
            # Leverages equal in exact arithmetic (e.g. all 1/n) differ by rounding (~1e-16 on
            # the QR path): rank them as ties, not as noise.
            rho = spearman_correlation(m[ok], np.round(cols["leverage"][ok], 12))
            text = (f"{rho:.3f}" if np.isfinite(rho) else
                    "undefined (the LOO density ratio or the leverage is the same for every row)")
            print(f"\nSpearman rank correlation of the LOO density ratio with leverage: {text}")
    written = [csv_path.name] + ([figure.name] if figure is not None else [])
    print(f"\nWrote {', '.join(written)} in {out.resolve()}")
    return 0


# -------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxmem`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return _EXIT_ERROR
    # TFDS and orbax log through absl at WARNING for things that are not the user's
    # business (e.g. an empty data set folder before our own "not prepared" error).
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # restores showwarning for an in-process caller
            warnings.showwarning = _show_warning
            return int(args.func(args))
    except KeyboardInterrupt:
        where = getattr(args, "out", None)
        hint = ""
        if args.command == "run" and where:
            from jaxmem.pipeline import _holds_saved_result

            where = os.path.expanduser(where)
            if _holds_saved_result(where):  # the report was being written
                hint = (f"; the scores are saved in {os.path.join(where, 'result.npz')}: run "
                        f"`{_PROG} report {shlex.quote(where)}` to write the figures and summary")
            else:
                hint = (f"; training checkpoints are in {os.path.join(where, 'checkpoints')}: run the "
                        "same command again to resume")
        print(f"\n{_PROG}: interrupted{hint}", file=sys.stderr, flush=True)
        return _EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        # Expected failures: bad data, bad options, a results directory of another run
        # (ConfigMismatchError is a ValueError, DatasetNotPreparedError a FileNotFoundError),
        # training that diverged (ensemble.TrainingDivergedError, a FloatingPointError).
        _fail(err)
    except OSError as err:  # unwritable output directory, full disk, ...
        # e.g. "No space left on device: DIR/checkpoints (the checkpoint of epoch 3 was not
        # written; epoch 2 is kept: ...)": the notes (add_note) say what was lost and kept.
        notes = "; ".join(getattr(err, "__notes__", ()))
        text = f"{err.strerror or err}: {err.filename}" if err.filename else str(err)
        _fail(f"{text} ({notes})" if notes else text)


if __name__ == "__main__":
    sys.exit(main())
