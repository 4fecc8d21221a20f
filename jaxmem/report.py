"""Figures and summaries of memorization scores.

Every function takes numpy arrays (scores from :mod:`jaxmem.scores`, leverage from
:mod:`jaxmem.linear`, images from :mod:`jaxmem.data`), so each can be used and tested
without training anything. Figures are drawn on ``matplotlib.figure.Figure`` objects
with the Agg canvas: no pyplot state, no global backend switch, safe in scripts,
notebooks and threads. Each ``plot_*`` writes a PNG and returns its path.

Conventions (van den Burg & Williams, 2021): ``M`` is the memorization score in nats
per example; "highly memorized" means ``M`` strictly above its 0.95 quantile; ``logp``
is ``U``, the log-likelihood of an example under the models trained on it, in nats.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxmem.data import nearest_neighbours
from jaxmem.membership import _check_int
from jaxmem.scores import _check_quantile, _quantile_rank  # 0 flags all above the minimum, 1 none

__all__ = [
    "SUMMARY_QUANTILES",
    "figure3_bins",
    "plot_examples_grid",
    "plot_figure3",
    "plot_influence",
    "plot_memorization_vs_leverage",
    "plot_score_distribution",
    "plot_scores_over_epochs",
    "spearman_correlation",
    "summary",
    "summary_markdown",
    "write_report",
    "REPORT_FILES",
]

SUMMARY_QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99, 0.995, 0.999)
"""Quantiles of ``M`` reported by :func:`summary`."""

_HIGH_COLOR = "#d62728"  # highly memorized: red throughout
_REGULAR_COLOR = "#1f77b4"
_STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "figure.dpi": 100,
    "savefig.dpi": 130,
}


# ------------------------------------------------------------------------ numbers


def _vector(a, name: str, n: int | None = None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D [examples], got shape {a.shape}")
    if len(a) == 0:
        raise ValueError(f"{name} is empty")
    if n is not None and len(a) != n:
        raise ValueError(f"{name} has {len(a)} values, expected {n} (one per example)")
    finite = np.isfinite(a)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{name} contains NaN or inf at {int((~finite).sum())} example(s); "
            f"the first is example {first} ({a[first]})"
        )
    return a


def _mask(a, name: str, n: int) -> np.ndarray:
    a = np.asarray(a)
    if a.shape != (n,) or a.dtype != np.bool_:
        raise ValueError(f"{name} must be a bool array of shape [{n}], got {a.dtype}{list(a.shape)}")
    return a


def _counts(a, name: str, n: int) -> np.ndarray:
    """Model counts ``[n]``: whole numbers >= 0 (floats like 3.0 are accepted)."""
    a = _vector(a, name, n)
    bad = np.flatnonzero((a < 0) | (a != np.round(a)))
    if bad.size:
        raise ValueError(
            f"{name} must be whole numbers >= 0 (models per example), but {bad.size} are not; "
            f"the first is example {int(bad[0])} ({a[bad[0]]})"
        )
    return a


def _highly_memorized(M: np.ndarray, quantile: float) -> tuple[np.ndarray, float]:
    """``M`` above its ``quantile`` quantile, decided by rank as :func:`jaxmem.scores.quantile_flags`."""
    threshold = float(np.quantile(M, _check_quantile(quantile)))
    return M > np.sort(M)[_quantile_rank(M.size, quantile)], threshold


def _drawable_shape(example_shape: Sequence[int]) -> bool:
    """An example shape the grid can draw: ``[height, width]`` or ``[height, width, channels]``
    with 1, 3 or 4 channels."""
    return len(example_shape) == 2 or (len(example_shape) == 3 and example_shape[-1] in (1, 3, 4))


def _drawable(images: np.ndarray) -> bool:
    """``[n, height, width]`` or ``[n, height, width, channels]`` with 1, 3 or 4 channels."""
    return _drawable_shape(images.shape[1:])


def _check_images(images: np.ndarray, name: str) -> np.ndarray:
    if not _drawable(images):
        raise ValueError(
            f"{name} must be [n, height, width] or [n, height, width, channels] images with "
            f"1, 3 or 4 channels, got shape {images.shape}"
        )
    return images


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the average of the ranks they span."""
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    ranks = np.empty(len(a))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman_correlation(a, b) -> float:
    """Spearman's rank correlation: the Pearson correlation of the ranks.

    Args:
      a: ``[n]`` values (e.g. memorization scores, nats).
      b: ``[n]`` values (e.g. leverage).

    Returns:
      A float in [-1, 1]; NaN when either input is constant (no ranking).
    """
    a = _vector(a, "a")
    b = _vector(b, "b", len(a))
    if len(a) < 2:
        raise ValueError("Spearman correlation needs at least 2 examples")
    ra, rb = _ranks(a) - (len(a) + 1) / 2.0, _ranks(b) - (len(b) + 1) / 2.0
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _central_interval(logp: np.ndarray, mass: float = 0.9) -> tuple[float, float]:
    tail = (1.0 - mass) / 2.0
    lo, hi = np.quantile(logp, [tail, 1.0 - tail])
    return float(lo), float(hi)


def summary(
    M,
    *,
    logp=None,
    leverage=None,
    in_counts=None,
    out_counts=None,
    highly_memorized=None,
    quantile: float = 0.95,
) -> dict[str, Any]:
    """Headline numbers of a memorization study, as a JSON-serialisable dict.

    Args:
      M: ``[n]`` memorization scores, nats.
      logp: optional ``[n]`` log-likelihoods under the models trained on each example
        (``U``), nats; gives the share of highly memorized observations inside the
        central 90% of log p (the paper found more than half: memorization is not
        just outlierness).
      leverage: optional ``[n]`` leverage of the linear baseline; gives Spearman's
        rank correlation with ``M``.
      in_counts, out_counts: optional ``[n]`` whole numbers >= 0: models trained with /
        without each example.
      highly_memorized: optional bool ``[n]``; default ``M > quantile(M, quantile)``.
      quantile: the quantile of ``M`` above which an example is highly memorized, in
        [0, 1] (1 flags none).

    Returns:
      A dict with ``n``; ``quantiles`` (``{"0.5": ..., ..., "0.999": ...}``, nats);
      ``mean``, ``max``; ``quantile`` and ``threshold`` (its value, nats);
      ``num_highly_memorized``; ``central_90_logp`` (``[lo, hi]``, nats) and
      ``share_highly_memorized_in_central_90`` (a fraction); ``spearman_leverage``;
      ``in_counts`` and ``out_counts`` (``{"min", "median", "max"}``). Entries whose
      inputs were not given are None.

    Raises:
      ValueError: an input is not ``[n]``, holds NaN or inf (the first named), a count
        is negative or fractional, ``highly_memorized`` is not bool ``[n]``, or
        ``quantile`` is outside [0, 1].

    Examples:
      >>> s = summary(np.arange(100.0), logp=-np.arange(100.0))
      >>> s["num_highly_memorized"], s["share_highly_memorized_in_central_90"]
      (5, 0.0)
    """
    M = _vector(M, "M")
    n = len(M)
    quantile = _check_quantile(quantile)
    if highly_memorized is None:
        high, threshold = _highly_memorized(M, quantile)
    else:
        high = _mask(highly_memorized, "highly_memorized", n)
        threshold = float(np.quantile(M, quantile))
    out: dict[str, Any] = {
        "n": n,
        "quantiles": {str(q): float(v) for q, v in zip(SUMMARY_QUANTILES,
                                                       np.quantile(M, SUMMARY_QUANTILES))},
        "mean": float(M.mean()),
        "max": float(M.max()),
        "quantile": float(quantile),
        "threshold": threshold,
        "num_highly_memorized": int(high.sum()),
        "central_90_logp": None,
        "share_highly_memorized_in_central_90": None,
        "spearman_leverage": None,
        "in_counts": None,
        "out_counts": None,
    }
    if logp is not None:
        logp = _vector(logp, "logp", n)
        lo, hi = _central_interval(logp)
        central = (logp >= lo) & (logp <= hi)
        out["central_90_logp"] = [lo, hi]
        if high.any():
            out["share_highly_memorized_in_central_90"] = float(central[high].mean())
    if leverage is not None:
        out["spearman_leverage"] = spearman_correlation(M, _vector(leverage, "leverage", n))
    for key, counts in (("in_counts", in_counts), ("out_counts", out_counts)):
        if counts is not None:
            c = _counts(counts, key, n)
            out[key] = {"min": int(c.min()), "median": float(np.median(c)), "max": int(c.max())}
    return out


def _logp_name(conditional: bool) -> str:
    """What ``U`` is called in texts: a density model's log p, or a classifier's log p(y|x)."""
    return "log p(y|x)" if conditional else "log p"


def summary_markdown(s: dict[str, Any], *, title: str = "Memorization summary",
                     conditional: bool = False) -> str:
    """Renders a :func:`summary` dict as a short markdown report.

    Args:
      s: a :func:`summary` dict.
      title: the report's heading.
      conditional: ``U`` is a classifier's log p(y|x) (label memorization), not a
        density log p(x): the central-90% line names log p(y|x) and is not compared with
        the paper, whose finding (more than half) is about densities.
    """
    lines = [f"## {title}", "", f"{s['n']} examples; memorization score M in nats.", ""]
    lines += ["| quantile | " + " | ".join(s["quantiles"]) + " |",
              "|---|" + "---|" * len(s["quantiles"]),
              "| M | " + " | ".join(f"{v:.3f}" for v in s["quantiles"].values()) + " |", ""]
    lines.append(f"- mean M: {s['mean']:.3f} nats, max: {s['max']:.3f} nats")
    lines.append(
        f"- highly memorized (M > {s['quantile']:g} quantile = {s['threshold']:.3f} nats): "
        f"{s['num_highly_memorized']} examples"
    )
    share = s["share_highly_memorized_in_central_90"]
    if share is not None:
        lo, hi = s["central_90_logp"]
        verdict = "more than half, as in the paper" if share > 0.5 else "not more than half"
        lines.append(
            f"- share of highly memorized examples inside the central 90% of {_logp_name(conditional)} "
            f"([{lo:.2f}, {hi:.2f}] nats): {100 * share:.1f}%" + ("" if conditional else f" ({verdict})")
        )
    if s["spearman_leverage"] is not None:
        lines.append(f"- Spearman rank correlation of M with leverage: {s['spearman_leverage']:.3f}")
    for key, label in (("in_counts", "models trained with"), ("out_counts", "models trained without")):
        c = s[key]
        if c is not None:
            lines.append(f"- {label} each example: min {c['min']}, median {c['median']:g}, "
                         f"max {c['max']}")
    return "\n".join(lines) + "\n"


def figure3_bins(logp, highly_memorized, bins: int = 20):
    """Counts of highly memorized and regular examples in equal-width bins of log p.

    Args:
      logp: ``[n]`` log-likelihoods (``U``), nats.
      highly_memorized: bool ``[n]``.
      bins: number of equal-width bins spanning ``[min(logp), max(logp)]``.

    Returns:
      ``(edges, high, regular)``: float ``[bins + 1]`` bin edges (nats) and int
      ``[bins]`` counts of highly memorized and of regular examples per bin.
    """
    logp = _vector(logp, "logp")
    high = _mask(highly_memorized, "highly_memorized", len(logp))
    edges = np.histogram_bin_edges(logp, bins=bins)
    return (edges, np.histogram(logp[high], edges)[0], np.histogram(logp[~high], edges)[0])


# ------------------------------------------------------------------------ figures


@contextlib.contextmanager
def _figure(path, figsize, metadata: dict[str, str] | None = None):
    """A figure to draw on, saved to ``path`` (format by its suffix) whole or not at all:
    a full disk leaves an earlier file there as it was, and raises an ``OSError`` naming
    ``path`` (:func:`jaxmem.checkpoint._write_atomically`)."""
    from jaxmem.checkpoint import _write_atomically

    path = pathlib.Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with mpl.rc_context(_STYLE):
        fig = Figure(figsize=figsize, layout="constrained")
        FigureCanvasAgg(fig)
        yield fig
        fmt = path.suffix[1:].lower() or mpl.rcParams["savefig.format"]
        _write_atomically(path, lambda f: fig.savefig(f, format=fmt, metadata=metadata), binary=True)


# PNG text chunk of the example grid: the sha256 of the scores it shows, by which
# write_report(keep_examples=True) tells a grid of the same scores from an older one.
_GRID_SCORES_KEY = "jaxmem M sha256"


def _scores_fingerprint(M: np.ndarray) -> str:
    from jaxmem.checkpoint import fingerprint_array  # orbax: only when a grid is drawn or kept

    return fingerprint_array(np.asarray(M, dtype=np.float64))


def _grid_shows(path: pathlib.Path, M: np.ndarray) -> bool:
    """Whether the example grid at ``path`` was drawn from the scores ``M`` ``[n]``."""
    from PIL import Image  # matplotlib's own dependency

    try:
        with Image.open(path) as img:
            recorded = getattr(img, "text", {}).get(_GRID_SCORES_KEY)
    except (OSError, ValueError):  # unreadable, not a PNG
        return False
    return recorded == _scores_fingerprint(M)


def plot_score_distribution(M, path: str | os.PathLike, *, quantile: float = 0.95,
                            bins: int = 60) -> pathlib.Path:
    """Histogram of memorization scores with their ``quantile`` marked.

    Args:
      M: ``[n]`` memorization scores, nats.
      path: the PNG to write.
      quantile: the quantile marked (the highly-memorized threshold).
      bins: histogram bins.

    Returns:
      ``path`` as a ``pathlib.Path``.
    """
    M = _vector(M, "M")
    high, threshold = _highly_memorized(M, quantile)
    with _figure(path, (7, 4.5)) as fig:
        ax = fig.add_subplot()
        edges = np.histogram_bin_edges(M, bins=bins)
        ax.hist(M, bins=edges, color=_REGULAR_COLOR, alpha=0.85)
        ax.axvline(threshold, color=_HIGH_COLOR, lw=2, ls="--",
                   label=f"{quantile:g} quantile = {threshold:.2f} nats\n"
                         f"({int(high.sum())} examples above)")
        ax.set_yscale("log")
        ax.set_xlabel("memorization score M (nats)")
        ax.set_ylabel("number of examples (log scale)")
        ax.set_title(f"Distribution of memorization scores (n = {len(M)})")
        ax.legend(loc="upper right")
    return pathlib.Path(path)


def plot_figure3(logp, highly_memorized, path: str | os.PathLike, *,
                 bins: int = 20, conditional: bool = False) -> pathlib.Path:
    """The paper's Figure 3: highly memorized vs regular examples across log p.

    Panel (a): counts of highly memorized and regular examples per bin of log p
    (log scale). Panel (b): the proportion of highly memorized examples per bin. Both
    shade the central 90% of log p; the title gives the share of highly memorized
    examples inside it.

    Args:
      logp: ``[n]`` log-likelihoods under the models trained on each example (``U``),
        nats.
      highly_memorized: bool ``[n]``.
      path: the PNG to write.
      bins: equal-width bins of log p.
      conditional: ``logp`` is a classifier's log p(y|x) (label memorization), not a
        density log p(x); the axes and titles say which.

    Returns:
      ``path`` as a ``pathlib.Path``.
    """
    edges, high, regular = figure3_bins(logp, highly_memorized, bins)
    logp = np.asarray(logp, dtype=np.float64)
    mask = np.asarray(highly_memorized)
    lo, hi = _central_interval(logp)
    inside = (logp >= lo) & (logp <= hi)
    share = inside[mask].mean() if mask.any() else None
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    total = high + regular
    name = _logp_name(conditional)
    xlabel = ("log p(y|x) under models trained on (x, y), U (nats)" if conditional else
              "log p(x) under models trained on x, U (nats)")
    with _figure(path, (12, 4.8)) as fig:
        ax_a, ax_b = fig.subplots(1, 2)
        for ax in (ax_a, ax_b):
            ax.axvspan(lo, hi, color="0.9", zorder=0, label=f"central 90% of {name}")
            ax.set_xlabel(xlabel)
        ax_a.bar(centers - width / 4, regular, width / 2, color=_REGULAR_COLOR, label="regular")
        ax_a.bar(centers + width / 4, high, width / 2, color=_HIGH_COLOR,
                 label="highly memorized")
        ax_a.set_yscale("log")
        ax_a.set_ylabel("number of examples (log scale)")
        ax_a.set_title(f"(a) counts per bin of {name}")
        ax_a.legend(loc="upper left")
        with np.errstate(invalid="ignore", divide="ignore"):
            prop = np.where(total > 0, high / total, np.nan)
        ax_b.bar(centers, prop, width * 0.9, color=_HIGH_COLOR, alpha=0.85,
                 label="highly memorized / all")
        ax_b.axhline(mask.mean(), color="k", ls="--", lw=1,
                     label=f"overall proportion ({mask.mean():.3f})")
        # Head room above the tallest bar keeps the legend clear of the bars.
        top = np.nanmax(prop) if np.isfinite(prop).any() else 0.0
        ax_b.set_ylim(0, min(1.0, max(top, 0.05) * 1.4))
        ax_b.set_ylabel("proportion highly memorized")
        ax_b.set_title("(b) proportion highly memorized per bin")
        ax_b.legend(loc="upper left")
        fig.suptitle(f"Highly memorized examples across {name}: {100 * share:.1f}% of them "
                     f"lie in the central 90% (n = {len(logp)})" if share is not None else
                     f"No highly memorized examples (n = {len(logp)})")
    return pathlib.Path(path)


def _show_image(ax, img, vmin, vmax):
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    else:
        ax.imshow(np.clip((img - vmin) / (vmax - vmin), 0, 1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_examples_grid(
    images,
    M,
    train_images,
    path: str | os.PathLike,
    *,
    per_group: int = 4,
    neighbours: int = 5,
    exclude_self: bool = True,
) -> pathlib.Path:
    """Most, median and least memorized examples, each beside its nearest neighbours.

    Rows come in three groups of ``per_group``: the examples with the highest ``M``,
    those around the median, and the lowest. Each row shows the example (red frame,
    with its index and ``M``) and its ``neighbours`` nearest training images in
    pixel space (Euclidean distance ``d`` under each).

    Args:
      images: ``[n, height, width(, channels)]`` the scored examples (1, 3 or 4
        channels), intensities in [0, 1] (other ranges are scaled to the data's
        min..max).
      M: ``[n]`` memorization scores, nats.
      train_images: ``[N, height, width(, channels)]`` the neighbour pool.
      path: the PNG to write.
      per_group: rows per group.
      neighbours: neighbours per row, at most what the pool holds (``N``, or ``N - 1``
        with ``exclude_self``): fewer are drawn for a smaller pool.
      exclude_self: ``images[i]`` is ``train_images[i]`` (the scores are of training
        examples): leave each example out of its own neighbours. Needs ``n == N``.

    Returns:
      ``path`` as a ``pathlib.Path``. The PNG records the sha256 of ``M`` (text chunk
      ``"jaxmem M sha256"``), by which :func:`write_report` knows a grid of the same scores.

    Raises:
      ValueError: ``images`` or ``train_images`` are not images of 1, 3 or 4 channels
        (shapes named), ``M`` is not ``[n]`` finite scores, ``exclude_self`` with
        ``n != N``, or a pool with no neighbour to show (one image with ``exclude_self``).
    """
    images = _check_images(np.asarray(images, dtype=np.float32), "images")
    train_images = _check_images(np.asarray(train_images, dtype=np.float32), "train_images")
    M = _vector(M, "M", len(images))
    if exclude_self and len(images) != len(train_images):
        raise ValueError(
            f"exclude_self needs images to be the training images ({len(images)} vs "
            f"{len(train_images)}); pass exclude_self=False for other queries"
        )
    available = len(train_images) - int(exclude_self)
    if available < 1:
        raise ValueError(f"a pool of {len(train_images)} image(s) leaves no neighbour to show "
                         f"(exclude_self={exclude_self})")
    neighbours = min(_check_int("neighbours", neighbours, 1), available)
    per_group = min(per_group, len(images) // 3 or 1)
    order = np.argsort(M, kind="stable")
    mid = len(M) // 2 - per_group // 2
    groups = [
        ("most memorized", order[::-1][:per_group]),
        ("median", order[mid : mid + per_group]),
        ("least memorized", order[:per_group]),
    ]
    chosen = np.concatenate([idx for _, idx in groups])
    nbr, dist = nearest_neighbours(
        images[chosen], train_images, neighbours,
        exclude=chosen if exclude_self else None,
    )
    lo = min(float(images.min()), float(train_images.min()))
    hi = max(float(images.max()), float(train_images.max()))
    vmin, vmax = (0.0, 1.0) if lo >= 0.0 and hi <= 1.0 else (lo, hi)

    rows, cols = len(chosen), neighbours + 1
    with _figure(path, (1.25 * cols + 1.4, 1.3 * rows + 0.9),
                 metadata={_GRID_SCORES_KEY: _scores_fingerprint(M)}) as fig:
        subfigs = fig.subfigures(len(groups), 1, hspace=0.02)
        r = 0
        for sub, (label, idx) in zip(subfigs, groups):
            sub.suptitle(label, fontsize=11, fontweight="bold", x=0.02, ha="left")
            axes = sub.subplots(len(idx), cols, squeeze=False)
            for row, i in enumerate(idx):
                ax = axes[row, 0]
                _show_image(ax, images[i], vmin, vmax)
                for spine in ax.spines.values():
                    spine.set_edgecolor(_HIGH_COLOR)
                    spine.set_linewidth(2.5)
                ax.set_xlabel(f"#{i}  M={M[i]:.2f}", fontsize=9)
                for c in range(neighbours):
                    ax = axes[row, c + 1]
                    _show_image(ax, train_images[nbr[r, c]], vmin, vmax)
                    ax.set_xlabel(f"#{nbr[r, c]}  d={dist[r, c]:.2f}", fontsize=8)
                r += 1
        fig.suptitle(f"Examples (red frame) and their {neighbours} nearest training images\n"
                     "d: Euclidean distance in pixel space", fontsize=12)
    return pathlib.Path(path)


def plot_memorization_vs_leverage(M, leverage, path: str | os.PathLike, *,
                                  quantile: float = 0.95) -> pathlib.Path:
    """Memorization score against the linear baseline's leverage, with Spearman's rho.

    Args:
      M: ``[n]`` memorization scores, nats.
      leverage: ``[n]`` leverage ``h_i`` of the same examples (in (0, 1]).
      path: the PNG to write.
      quantile: examples with ``M`` above this quantile are drawn in red.

    Returns:
      ``path`` as a ``pathlib.Path``.
    """
    M = _vector(M, "M")
    leverage = _vector(leverage, "leverage", len(M))
    rho = spearman_correlation(M, leverage)
    high, _ = _highly_memorized(M, quantile)
    with _figure(path, (7, 5)) as fig:
        ax = fig.add_subplot()
        ax.scatter(leverage[~high], M[~high], s=10, alpha=0.5, color=_REGULAR_COLOR,
                   label="regular", edgecolors="none")
        ax.scatter(leverage[high], M[high], s=14, alpha=0.8, color=_HIGH_COLOR,
                   label=f"highly memorized (M > {quantile:g} quantile)", edgecolors="none")
        if leverage.min() > 0 and leverage.max() / leverage.min() > 50:
            ax.set_xscale("log")
            ax.set_xlabel("leverage h (linear baseline, log scale)")
        else:
            ax.set_xlabel("leverage h (linear baseline)")
        ax.set_ylabel("memorization score M (nats)")
        ax.set_title(f"Memorization vs leverage: Spearman ρ = {rho:.3f} (n = {len(M)})")
        # Highly memorized points sit at the top: keep the legend out of their way.
        ax.legend(loc="lower right")
    return pathlib.Path(path)


def plot_scores_over_epochs(epochs: Sequence[int], M_by_epoch, path: str | os.PathLike, *,
                            track: int = 5) -> pathlib.Path:
    """How the distribution of ``M`` evolves during training.

    Shows the median, the 5%-95% band and the 0.95 / 0.995 quantiles of ``M`` per
    epoch, and the trajectories of the ``track`` examples most memorized at the last
    epoch.

    Args:
      epochs: ``[E]`` epoch numbers.
      M_by_epoch: ``[E, n]`` memorization scores after each epoch, nats.
      path: the PNG to write.
      track: examples whose trajectories are drawn.

    Returns:
      ``path`` as a ``pathlib.Path``.
    """
    epochs = _vector(epochs, "epochs")
    Mt = np.asarray(M_by_epoch, dtype=np.float64)
    if Mt.ndim != 2 or Mt.shape[0] != len(epochs):
        raise ValueError(f"M_by_epoch must be [{len(epochs)} epochs, n], got {Mt.shape}")
    for e in range(len(epochs)):
        _vector(Mt[e], f"M_by_epoch[{e}]")
    q = np.quantile(Mt, [0.05, 0.5, 0.95, 0.995], axis=1)
    top = np.argsort(Mt[-1])[::-1][:track]
    with _figure(path, (9.5, 5)) as fig:
        ax = fig.add_subplot()
        ax.fill_between(epochs, q[0], q[2], color=_REGULAR_COLOR, alpha=0.2,
                        label="5%-95% of examples")
        ax.plot(epochs, q[1], color=_REGULAR_COLOR, lw=2, marker="o", label="median")
        ax.plot(epochs, q[2], color="k", ls="--", label="0.95 quantile")
        ax.plot(epochs, q[3], color="k", ls=":", label="0.995 quantile")
        for j, i in enumerate(top):
            ax.plot(epochs, Mt[:, i], color=_HIGH_COLOR, lw=1, alpha=0.7,
                    label=f"top {track} at the last epoch" if j == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("memorization score M (nats)")
        ax.set_title(f"Memorization scores during training (n = {Mt.shape[1]})")
        # The top trajectories run along the top and the band and median fill the rest, at
        # any epoch: the legend goes beside the axes, out of the way of every line.
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return pathlib.Path(path)


def plot_influence(leverage, studentized_residuals, cooks_distance,
                   path: str | os.PathLike, *, num_params: int | None = None,
                   label_top: int = 5, index=None) -> pathlib.Path:
    """The classic influence plot of a linear model.

    Studentized residual against leverage, marker area proportional to Cook's
    distance; dashed lines at residuals of +-2 and, given ``num_params``, at the
    rule-of-thumb high leverage ``2 p / n``. The ``label_top`` examples with the
    largest Cook's distance are labelled with their index (``index[i]``).

    Args:
      leverage: ``[n]`` hat-matrix diagonal ``h_i``.
      studentized_residuals: ``[n]`` (externally) studentized residuals.
      cooks_distance: ``[n]`` Cook's distances (non-negative).
      path: the PNG to write.
      num_params: ``p``, the number of columns of the design matrix.
      label_top: how many of the most influential examples to label.
      index: optional ``[n]`` integer labels of the points, e.g. their rows in the
        full data when some rows were left out (``np.flatnonzero(keep)``); default
        ``0 .. n - 1``.

    Returns:
      ``path`` as a ``pathlib.Path``.
    """
    h = _vector(leverage, "leverage")
    r = _vector(studentized_residuals, "studentized_residuals", len(h))
    d = _vector(cooks_distance, "cooks_distance", len(h))
    if (d < 0).any():
        raise ValueError(f"cooks_distance must be >= 0; example {int(np.argmax(d < 0))} is "
                         f"{d[np.argmax(d < 0)]}")
    if index is None:
        index = np.arange(len(h))
    else:
        index = np.asarray(index)
        if index.shape != (len(h),) or not np.issubdtype(index.dtype, np.integer):
            raise ValueError(f"index must be [n] = ({len(h)},) integers (the label of each point), "
                             f"got shape {index.shape} dtype {index.dtype}")
    area = 10 + 400 * d / d.max() if d.max() > 0 else np.full(len(d), 10.0)
    with _figure(path, (7.5, 5.5)) as fig:
        ax = fig.add_subplot()
        ax.scatter(h, r, s=area, alpha=0.5, color=_REGULAR_COLOR, edgecolors="k",
                   linewidths=0.3)
        for level in (-2, 2):
            ax.axhline(level, color="0.4", ls="--", lw=1)
        if num_params is not None:
            ax.axvline(2 * num_params / len(h), color=_HIGH_COLOR, ls="--", lw=1,
                       label=f"high leverage 2p/n = {2 * num_params / len(h):.3f}")
            ax.legend(loc="upper right")
        for i in np.argsort(d)[::-1][:label_top]:
            ax.annotate(f"#{index[i]}", (h[i], r[i]), xytext=(4, 4), textcoords="offset points",
                        fontsize=9)
        ax.set_xlabel("leverage h")
        ax.set_ylabel("studentized residual")
        ax.set_title(f"Influence plot (marker area ∝ Cook's distance, n = {len(h)})")
    return pathlib.Path(path)


# ------------------------------------------------------------------------ results dir

REPORT_FILES: dict[str, str] = {
    "distribution": "memorization_distribution.png",
    "figure3": "figure3_logp.png",
    "examples": "examples_nearest_neighbours.png",
    "leverage": "memorization_vs_leverage.png",
    "epochs": "memorization_over_epochs.png",
    "summary": "summary.md",
    "summary_json": "summary.json",
}
"""File names :func:`write_report` writes into a results directory."""


def _run_description(config: dict[str, Any]) -> list[str]:
    """Markdown lines saying what was run (data, model, plan, training, scoring)."""
    data, model = config.get("data", {}), config.get("model", {})
    plan, train = config.get("plan", {}), config.get("training", {})
    scoring = config.get("scoring", {})
    options = {k: v for k, v in sorted(model.items()) if k not in ("name", "example_shape")}
    if options.get("binarize") == "none" and data.get("binarize") == "static":
        # The loader drew the binary pixels once (`jaxmem run --binarize static`); the model
        # then takes them as they are.
        options["binarize"] = "static"
    shown = ", ".join(f"{k}={v}" for k, v in options.items())
    design = (f"{plan.get('k')} folds x {plan.get('repeats')} repeat(s)"
              if plan.get("kind") == "kfold" else f"{plan.get('kind')} subsets")
    full = " + 1 full model trained on every example" if train.get("full_model") else ""
    optimizer = (f"Adam lr {train.get('learning_rate', '?')}"
                 if train.get("optimizer", "adam") == "adam" else "a custom optimizer")
    if model.get("name") == "classifier":
        scored = "- log p(y|x): exact (classifier)"
    else:
        scored = f"- log p: importance-weighted with {scoring.get('num_samples', '?')} samples"
        if scoring.get("preprocess_draws", 1) > 1:
            scored += (f", averaged over {scoring['preprocess_draws']} draws of the preprocessing "
                       "(binarization or dequantization)")
    lines = _software(config.get("provenance"))
    return [
        f"- data: {data.get('name', '?')} ({data.get('n', '?')} examples of shape "
        f"{tuple(data.get('example_shape', ()))})",
        f"- model: {model.get('name', '?')} ({shown})",
        f"- plan: {design}, {plan.get('num_models', '?')} models{full}",
        f"- training: {train.get('epochs', '?')} epochs, batch {train.get('batch_size', '?')}, "
        f"{optimizer}, seed {train.get('seed', '?')}",
        scored + (", bf16 matmuls (float32 accumulation)" if scoring.get("matmul_dtype") == "bfloat16" else ""),
        *lines,
    ]


def _software(p: Any) -> list[str]:
    """The run's software line (its ``provenance``: the versions that set training's float
    rounding), with the earlier sessions' jax versions of a run resumed under others."""
    if not isinstance(p, dict):  # results written before it was recorded
        return []
    line = (f"- software: jax {p.get('jax')} (jaxlib {p.get('jaxlib')}), flax {p.get('flax')}, "
            f"optax {p.get('optax')}, Python {p.get('python')}, on {p.get('device_kind')}")
    earlier = [e for e in p.get("earlier", []) if isinstance(e, dict)]
    if earlier:
        line += "; resumed from sessions under jax " + ", ".join(str(e.get("jax")) for e in earlier)
    return [line]


def _dataset_images(dataset, n: int, config: dict[str, Any]) -> np.ndarray | None:
    """The images of ``dataset`` (a Dataset or an array) for the example grid, or None.

    Refuses what cannot be drawn as the ``n`` scored examples instead of leaving the
    grid out: not ``n`` of them, not images, or another number of values per example
    than the run recorded in ``config["data"]["example_shape"]``.
    """
    if dataset is None:
        return None
    images = np.asarray(getattr(dataset, "x", dataset))
    recorded = config.get("data", {}).get("example_shape")
    expected = (f"[{n}, height, width] or [{n}, height, width, channels] images (1, 3 or 4 "
                f"channels), the {n} scored examples in order")
    if images.ndim < 1 or len(images) != n:
        raise ValueError(f"dataset must be {expected}; got shape {images.shape}")
    if recorded is not None and int(np.prod(images.shape[1:])) != int(np.prod(recorded)):
        raise ValueError(
            f"dataset holds examples of shape {tuple(images.shape[1:])} but the result scored "
            f"examples of shape {tuple(recorded)}: pass the scored examples"
        )
    if not _drawable(images):
        hint = (" (reshape flat examples to [n, height, width], or leave dataset out for "
                "non-image data)") if images.ndim == 2 else ""
        raise ValueError(f"dataset must be {expected}; got shape {images.shape}{hint}")
    return images


def write_report(result, directory: str | os.PathLike, dataset=None, *,
                 keep_examples: bool = False) -> dict[str, Any]:
    """Every figure and the summary of a memorization result, written into ``directory``.

    Writes (names in :data:`REPORT_FILES`): the distribution of ``M`` with its
    quantile; the paper's Figure 3a/3b over ``U`` (named log p(y|x) for a classifier,
    ``config["model"]["name"]``, whose summary is then not compared with the paper's
    densities); the most, median and least memorized examples beside their nearest
    training neighbours (image data, when ``dataset`` is given, with up to 5
    neighbours, fewer when there are fewer other examples); ``M``
    against the linear baseline's leverage (when the result has it); ``M`` over epochs
    (when it was tracked); ``summary.md`` and ``summary.json``. A file of that list that
    this report does not write (left by an earlier report of the same directory) is
    deleted, so that every figure in ``directory`` belongs to this summary; other files
    are left alone. The one exception is ``keep_examples``.

    Args:
      result: a :class:`jaxmem.pipeline.MemorizationResult` (fields ``M``, ``U``,
        ``n_in``, ``n_out``, ``highly_memorized``, ``leverage``, ``tracked_epochs``,
        ``M_by_epoch``, ``label_memorization``, ``config``; scores in nats).
      directory: where to write (created if missing).
      dataset: optional :class:`jaxmem.data.Dataset` (or an array ``[n, H, W(, C)]``,
        1, 3 or 4 channels) holding the scored examples in the same order; needed for
        the image grid.
      keep_examples: when ``dataset`` is None, keep the example grid that an earlier
        report drew in ``directory`` (e.g. ``jaxmem run``'s, whose images cannot be
        reloaded now) instead of deleting it, provided it shows these very scores (the
        sha256 of ``M`` that :func:`plot_examples_grid` records in the PNG); a grid of
        other scores, or one without that record, is deleted all the same. A kept grid
        is listed in ``summary.md`` as kept.

    Returns:
      ``{"files": {kind: path}, "kept": {kind: path}, "summary": summary dict,
      "markdown": str}``: ``files`` the files written, ``kept`` those kept as they were
      (``{"examples": ...}`` or empty).
      ``summary.json`` is strict JSON: a value that is not a finite number (Spearman's
      rho of a constant leverage, NaN in the dict) is written as null.

    Raises:
      ValueError: before anything is written: ``result`` lacks a field named above,
        ``dataset`` is not ``n`` images (its
        shape and the one expected named; flat examples such as ``[n, 64]`` must be
        reshaped to ``[n, 8, 8]`` first), its examples hold another number of values
        than the scored ones (``config["data"]["example_shape"]``), the quantile in
        ``config["scoring"]`` is outside [0, 1], ``label_memorization`` is not ``[n]``
        finite values, or a field of ``result`` is refused by :func:`summary`.
      RunDirectoryBusyError: another thread or process (a run writing its results,
        another report) holds ``directory`` (:func:`jaxmem.run_lock`), which the report
        holds while it writes.
      OSError: a file cannot be written (e.g. ``ENOSPC``, a full disk): the error names
        it; every file is written whole or not at all, so an earlier report's file of
        that name is left as it was, and no temporary file is left behind.
    """
    lacking = [f for f in ("M", "U", "n_in", "n_out", "highly_memorized") if not hasattr(result, f)]
    if lacking:
        raise ValueError(f"result must be a MemorizationResult (jaxmem.memorization or jaxmem.load_result); "
                         f"this {type(result).__name__} has no {', '.join(lacking)}")
    config = getattr(result, "config", None) or {}
    quantile = _check_quantile(config.get("scoring", {}).get("quantile", 0.95))
    conditional = config.get("model", {}).get("name") == "classifier"  # U is log p(y|x)
    M = _vector(result.M, "M")
    images = _dataset_images(dataset, len(M), config)
    leverage = getattr(result, "leverage", None)
    label_mem = getattr(result, "label_memorization", None)
    if label_mem is not None:
        label_mem = _vector(label_mem, "label_memorization", len(M))
    s = summary(M, logp=result.U, leverage=leverage, in_counts=result.n_in,
                out_counts=result.n_out, highly_memorized=np.asarray(result.highly_memorized),
                quantile=quantile)
    from jaxmem.checkpoint import run_lock  # orbax: imported when a report is written

    directory = pathlib.Path(directory).expanduser()
    # Held as `jaxmem report` holds it: not while a run (memorization, `jaxmem run`)
    # writes this directory, nor two reports at once (re-entrant for the run itself).
    with run_lock(directory, "results directory"):
        return _write_files(result, directory, s, M, images, leverage, label_mem, config,
                            quantile, conditional, keep_examples)


def _write_files(result, directory: pathlib.Path, s: dict, M: np.ndarray, images, leverage, label_mem,
                 config: dict, quantile: float, conditional: bool, keep_examples: bool) -> dict[str, Any]:
    """:func:`write_report` after its checks, with ``directory`` held."""
    from jaxmem.checkpoint import _write_atomically

    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, pathlib.Path] = {}
    files["distribution"] = plot_score_distribution(
        M, directory / REPORT_FILES["distribution"], quantile=quantile)
    files["figure3"] = plot_figure3(result.U, np.asarray(result.highly_memorized),
                                    directory / REPORT_FILES["figure3"], conditional=conditional)
    if images is not None and len(images) >= 2:  # one image has no neighbour to show
        files["examples"] = plot_examples_grid(images, M, images,
                                               directory / REPORT_FILES["examples"])
    if leverage is not None:
        files["leverage"] = plot_memorization_vs_leverage(
            M, leverage, directory / REPORT_FILES["leverage"], quantile=quantile)
    tracked = getattr(result, "tracked_epochs", None)
    if tracked is not None and len(tracked) > 0:
        files["epochs"] = plot_scores_over_epochs(
            tracked, result.M_by_epoch, directory / REPORT_FILES["epochs"])

    if label_mem is not None:
        lm = label_mem
        s["label_memorization"] = {"mean": float(lm.mean()), "max": float(lm.max()),
                                   "num_above_0.5": int((lm > 0.5).sum())}
    lines = [summary_markdown(s, conditional=conditional).rstrip("\n"), ""]
    if label_mem is not None:
        lm = s["label_memorization"]
        lines += [f"- Feldman & Zhang label memorization: mean {lm['mean']:.3f}, "
                  f"max {lm['max']:.3f}, {lm['num_above_0.5']} examples above 0.5", ""]
    if config:
        lines += ["### Run", "", *_run_description(config), ""]
    lines += ["### Files", "", "- `scores.csv`, `result.npz`: every score of every example"]
    lines += [f"- `{p.name}`" for p in files.values()]
    kept: dict[str, pathlib.Path] = {}
    grid = directory / REPORT_FILES["examples"]
    if keep_examples and "examples" not in files and grid.is_file() and _grid_shows(grid, M):
        kept["examples"] = grid
        lines.append(f"- `{grid.name}` (kept from an earlier report of these scores)")
    markdown = "\n".join(lines) + "\n"
    for kind, text in (("summary", markdown), ("summary_json", _json_text(s))):
        path = directory / REPORT_FILES[kind]
        _write_atomically(path, lambda f, text=text: f.write(text))
        files[kind] = path
    # A figure of an earlier report that this one did not draw (images not given, no
    # leverage...) would look current beside this summary, which does not list it.
    for kind, name in REPORT_FILES.items():
        stale = directory / name
        if kind not in files and kind not in kept and stale.is_file():
            stale.unlink()
    return {"files": files, "kept": kept, "summary": s, "markdown": markdown}


def _json_text(obj: Any) -> str:
    """Strict JSON (RFC 8259): a NaN or inf (e.g. Spearman's rho of a constant leverage) is written as null."""
    return json.dumps(_finite_or_none(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj
