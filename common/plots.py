"""PNG plots for runs and federated experiments (matplotlib Agg, no window, atomic writes)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from leukfed.common.atomic import atomic_write_bytes
from leukfed.common.metrics import binary_auc, roc_curve

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 120
_SPLITS = ("train", "val", "test")


def _figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas: no pyplot, no global backend switch, never shown."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> Path:
    """Render ``fig`` as PNG and write it atomically (temp file in the same folder + os.replace)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata=dict(metadata or {}))
    return atomic_write_bytes(path, buffer.getvalue())


def _finish(ax: Axes, title: str | None = None) -> None:
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)


def _integer_ticks_if_whole(ax: Axes, xs: Sequence[Any]) -> None:
    """Keep x ticks on whole numbers when every x is one (epochs, rounds)."""
    from matplotlib.ticker import MaxNLocator

    if xs and all(float(x).is_integer() for x in xs):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _hlines(ax: Axes, lines: Mapping[str, float]) -> None:
    for i, (label, y) in enumerate(lines.items()):
        ax.axhline(float(y), linestyle="--", linewidth=1.2, color=f"C{(i + 5) % 10}", label=label)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if h.get(key) is None else float(h[key]) for h in history])


def _history_keys(history: Sequence[Mapping[str, Any]], metric: str) -> list[str]:
    candidates = [f"{split}_{metric}" for split in _SPLITS] + [metric]
    return [k for k in candidates if any(h.get(k) is not None for h in history)]


def _match_reference(label: str, metrics: Sequence[str]) -> str:
    """The metric a reference line belongs to: the longest metric name ``label`` ends with."""
    hits = [m for m in metrics if label.endswith(m)]
    if not hits:
        raise ValueError(f"reference {label!r} matches none of the metrics {list(metrics)}")
    return max(hits, key=len)


def plot_history(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *,
                 metrics: Sequence[str] = ("loss", "accuracy"), title: str | None = None,
                 reference: Mapping[str, float] | None = None, xlabel: str = "epoch") -> Path:
    """One panel per metric with its ``train_``/``val_``/``test_``/bare keys across epochs or rounds.

    x comes from each entry's ``xlabel`` key (``epoch`` or ``round``) when present, else 1, 2, ...
    A ``reference`` line goes on the panel of the metric its label ends with, e.g.
    ``{"centralized accuracy": 0.93}`` -> the accuracy panel.
    """
    panels = {m: keys for m in metrics if (keys := _history_keys(history, m))}
    if not panels:
        raise ValueError(f"history has no values for any of {list(metrics)}")
    refs = {label: _match_reference(label, metrics) for label in (reference or {})}
    x = [h.get(xlabel, i + 1) for i, h in enumerate(history)]
    fig = _figure(5.0 * len(panels), 3.8)
    for ax, (metric, keys) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels.items()):
        for key in keys:
            ax.plot(x, _series(history, key), marker="o", markersize=3, label=key)
        _hlines(ax, {k: float(v) for k, v in (reference or {}).items() if refs[k] == metric})
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        _integer_ticks_if_whole(ax, x)
        _finish(ax, metric)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _row_fractions(cm: np.ndarray) -> np.ndarray:
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)


def plot_confusion_matrix(cm: Any, class_names: Sequence[str], path: str | os.PathLike[str], *,
                          normalize: bool = True, title: str | None = None) -> Path:
    """Heat map (rows = true) annotated with counts and row percentages; colour by row share if normalize."""
    counts = np.asarray(cm, dtype=np.int64)
    c = len(class_names)
    if counts.shape != (c, c):
        raise ValueError(f"confusion matrix shape {counts.shape} does not match {c} class names")
    frac = _row_fractions(counts)
    shown = frac if normalize else counts
    vmax = 1.0 if normalize else max(int(counts.max()), 1)
    size = max(4.0, 1.0 * c + 2.0)
    fig = _figure(size + 1.0, size)
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=vmax)
    fig.colorbar(image, ax=ax, label="row fraction" if normalize else "count")
    for i in range(c):
        for j in range(c):
            colour = "white" if shown[i, j] > 0.5 * vmax else "black"
            ax.text(j, i, f"{counts[i, j]}\n{100 * frac[i, j]:.1f}%", ha="center", va="center",
                    color=colour, fontsize="small")
    ax.set_xticks(range(c), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(c), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def _count_matrix(site_counts: Sequence[Mapping[str, int]], class_names: Sequence[str]) -> np.ndarray:
    unknown = sorted({k for counts in site_counts for k in counts} - set(class_names))
    if unknown:
        raise ValueError(f"site counts name unknown classes: {unknown}")
    return np.array([[int(counts.get(c, 0)) for c in class_names] for counts in site_counts])


def _colour(cmap: str, index: int) -> Any:
    from matplotlib import colormaps

    cm = colormaps[cmap]
    return cm(index % cm.N)


def plot_label_distribution(site_counts: Sequence[Mapping[str, int]], class_names: Sequence[str],
                            path: str | os.PathLike[str], *, site_names: Sequence[str] | None = None,
                            title: str | None = None) -> Path:
    """Stacked bars: one bar per site, one segment per class, total on top."""
    counts = _count_matrix(site_counts, class_names)
    names = list(site_names) if site_names is not None else [f"site {i}" for i in range(len(counts))]
    if len(names) != len(counts):
        raise ValueError(f"got {len(names)} site names for {len(counts)} sites")
    fig = _figure(max(5.0, 0.8 * len(names) + 3.0), 4.0)
    ax = fig.subplots()
    cmap = "tab10" if len(class_names) <= 10 else "tab20"
    bottom = np.zeros(len(names))
    for k, cls in enumerate(class_names):
        ax.bar(names, counts[:, k], bottom=bottom, label=cls, color=_colour(cmap, k))
        bottom += counts[:, k]
    for i, total in enumerate(bottom):
        ax.text(i, total, str(int(total)), ha="center", va="bottom", fontsize="small")
    ax.margins(y=0.08)
    ax.set_ylabel("images")
    _finish(ax, title or "label distribution per site")
    return _save(fig, path)


def plot_curves(series: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike[str], *,
                xlabel: str, ylabel: str, title: str | None = None,
                hlines: Mapping[str, float] | None = None) -> Path:
    """Generic multi-line plot of (x, y) points per label, plus dashed horizontal reference lines."""
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    xs: list[float] = []
    for label, points in series.items():
        xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        ax.plot(xy[:, 0], xy[:, 1], marker="o", markersize=3, label=label)
        xs += xy[:, 0].tolist()
    _integer_ticks_if_whole(ax, xs)
    _hlines(ax, hlines or {})
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _finish(ax, title)
    return _save(fig, path)


def plot_roc(y_binary: Any, score: Any, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """ROC curve of a binary problem with its AUC in the legend and the chance diagonal."""
    fpr, tpr, _ = roc_curve(y_binary, score)
    auc = binary_auc(y_binary, score)
    fig = _figure(4.5, 4.5)
    ax = fig.subplots()
    ax.plot(fpr, tpr, label="AUC n/a" if auc is None else f"AUC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_aspect("equal")
    _finish(ax, title or "ROC curve")
    return _save(fig, path)


def plot_reliability(tables: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str], *,
                     title: str | None = None) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin (from
    ``calibration.reliability_bins``), one line per table, the diagonal, and bin counts below."""
    fig = _figure(5.0, 6.0)
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    for label, table in tables.items():
        points = [(c, a) for c, a in zip(table["confidence"], table["accuracy"]) if c is not None]
        xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        top.plot(xy[:, 0], xy[:, 1], marker="o", markersize=4, label=label)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    _finish(top, title or "reliability diagram")
    edges = np.asarray(next(iter(tables.values()))["edges"]) if tables else np.linspace(0, 1, 2)
    width = float(edges[1] - edges[0]) / max(len(tables), 1)
    for i, (label, table) in enumerate(tables.items()):
        bottom.bar(edges[:-1] + i * width, table["count"], width=width, align="edge", label=label)
    bottom.set_xlabel("confidence (top-class probability)")
    bottom.set_ylabel("count")
    return _save(fig, path)


def plot_tiles(tiles: Sequence[np.ndarray], captions: Sequence[str], path: str | os.PathLike[str], *,
               title: str | None = None, columns: int = 4, metadata: Mapping[str, str] | None = None) -> Path:
    """A grid of RGB uint8 images (H, W, 3), each captioned; ``metadata`` goes into the PNG's text chunks."""
    if not tiles or len(tiles) != len(captions):
        raise ValueError(f"got {len(tiles)} tiles and {len(captions)} captions")
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    fig = _figure(2.4 * columns, 2.7 * rows + (0.4 if title else 0.0))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, tile, caption in zip(axes, tiles, captions):
        ax.imshow(tile)
        ax.set_title(caption, fontsize="x-small")
    if title:
        fig.suptitle(title, fontsize="small")
    return _save(fig, path, metadata)
