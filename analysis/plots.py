"""Labelled matplotlib plots for the notebooks and the report: every figure titled, every
axis labelled (``label`` refuses an empty one)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import pandas as pd

if TYPE_CHECKING:  # matplotlib is an optional (notebooks) dependency
    from matplotlib.axes import Axes


def _axes(ax: Optional["Axes"], size: tuple[float, float]) -> "Axes":
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=size, layout="constrained")
    return ax


def label(ax: "Axes", title: str, xlabel: str, ylabel: str) -> "Axes":
    """Title and label the axes; all three are required, so no figure goes unlabelled."""
    for name, text in (("title", title), ("xlabel", xlabel), ("ylabel", ylabel)):
        if not text or not str(text).strip():
            raise ValueError(f"every plot needs a {name}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def bar(
    data: Union[pd.Series, pd.DataFrame],
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    horizontal: bool = False,
    stacked: bool = False,
    legend_title: Optional[str] = None,
    ax: Optional["Axes"] = None,
) -> "Axes":
    """Bar chart of a Series or of a DataFrame's columns (grouped, or stacked)."""
    ax = _axes(ax, (8, 4.5))
    ticks = [_tick(value) for value in data.index]
    upright = horizontal or max((len(t) for t in ticks), default=0) <= 6
    kind = "barh" if horizontal else "bar"
    data.plot(kind=kind, stacked=stacked, ax=ax, rot=0 if upright else 30, legend=False)
    (ax.set_yticklabels if horizontal else ax.set_xticklabels)(ticks)
    if isinstance(data, pd.DataFrame) and data.shape[1] > 1:
        ax.legend(title=legend_title or data.columns.name)
    if horizontal:
        ax.invert_yaxis()  # largest first, at the top
    return label(ax, title, xlabel, ylabel)


def lines(
    data: Union[pd.Series, pd.DataFrame],
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    area: bool = False,
    legend_title: Optional[str] = None,
    ax: Optional["Axes"] = None,
) -> "Axes":
    """Lines (or a stacked area) over the index, one per column."""
    ax = _axes(ax, (9, 4.5))
    if area:
        data.plot.area(ax=ax, linewidth=0)
    else:
        data.plot(ax=ax, marker="o" if len(data) <= 60 else None, markersize=3, linewidth=1.2)
    if isinstance(data, pd.DataFrame) and data.shape[1] > 1:
        outside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if area else {}
        ax.legend(title=legend_title or data.columns.name, **outside)
    return label(ax, title, xlabel, ylabel)


def heatmap(
    table: pd.DataFrame,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar_label: str,
    *,
    fmt: str = "{:.0%}",
    cmap: str = "viridis",
    ax: Optional["Axes"] = None,
) -> "Axes":
    """A table as coloured cells with their values written in, and a labelled colour bar."""
    ax = _axes(ax, (1.2 + 1.0 * max(len(table.columns), 1), 1.2 + 0.55 * max(len(table), 1)))
    values = table.to_numpy(dtype=float)
    image = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(table.columns)), [str(c) for c in table.columns], rotation=30)
    ax.set_yticks(range(len(table.index)), [_tick(i) for i in table.index])
    middle = (values.max() + values.min()) / 2 if values.size else 0
    for (row, column), value in _cells(values):
        colour = "black" if value > middle else "white"
        ax.text(column, row, fmt.format(value), ha="center", va="center", color=colour, size=8)
    ax.figure.colorbar(image, ax=ax).set_label(colorbar_label)
    return label(ax, title, xlabel, ylabel)


def scatter(
    x: Sequence[float],
    y: Sequence[float],
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    sizes: Optional[Sequence[float]] = None,
    logx: bool = False,
    ax: Optional["Axes"] = None,
) -> "Axes":
    """Points, optionally sized (e.g. by number of reviews)."""
    ax = _axes(ax, (7, 4.5))
    area = None if sizes is None else [15 + 25 * float(s) for s in sizes]
    ax.scatter(x, y, s=area, alpha=0.6, edgecolors="none")
    if logx:
        ax.set_xscale("log")
    return label(ax, title, xlabel, ylabel)


def histogram(
    groups: Mapping[Any, Sequence[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    bins: int = 30,
    logx: bool = False,
    legend_title: Optional[str] = None,
    ax: Optional["Axes"] = None,
) -> "Axes":
    """Overlaid histograms, one per group (e.g. per generation), on shared bins."""
    import numpy as np

    ax = _axes(ax, (8, 4.5))
    values = [np.asarray(v, dtype=float) for v in groups.values() if len(v)]
    if values:
        every = np.concatenate(values)
        low, high = float(every.min()), float(every.max())
        if logx:
            edges = np.geomspace(max(low, 1.0), max(high, 2.0), bins + 1)
            ax.set_xscale("log")
        else:
            edges = np.linspace(low, high if high > low else low + 1, bins + 1)
        style = {"histtype": "step", "linewidth": 2} if len(values) > 1 else {"alpha": 0.8}
        for name, group in groups.items():
            if len(group):
                ax.hist(np.asarray(group, dtype=float), bins=edges, label=str(name), **style)
        if len(groups) > 1:
            ax.legend(title=legend_title)
    return label(ax, title, xlabel, ylabel)


def boxplot(
    groups: Mapping[Any, Sequence[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    logy: bool = False,
    ax: Optional["Axes"] = None,
) -> "Axes":
    """One box per group (e.g. per star rating)."""
    ax = _axes(ax, (8, 4.5))
    names = [str(name) for name in groups]
    ax.boxplot([list(v) for v in groups.values()], tick_labels=names, showfliers=True)
    if logy:
        ax.set_yscale("log")
    return label(ax, title, xlabel, ylabel)


def _tick(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _cells(values):
    for row in range(values.shape[0]):
        for column in range(values.shape[1]):
            yield (row, column), values[row, column]
