"""Figures of a study, drawn only from a :class:`~analysis.compute.FrontInfo` (and a
:class:`~analysis.compute.CompareInfo`): static PNGs with matplotlib, one interactive HTML page
with plotly (hover shows run id, trial, RT type and objective values).
"""

from __future__ import annotations

import html
import textwrap
from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes or in CI

import matplotlib.pyplot as plt
import moocore
import numpy as np
import plotly.graph_objects as go
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from plotly.subplots import make_subplots

from analysis.compute import CompareInfo, FrontInfo, Objective

PALETTE = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]  # a ListedColormap
MARGIN = 0.02
#: narrowest axis range drawn (accuracy units): a front of near-equal points is not blown up
MIN_SPAN = 0.05
#: what the error bars show (the trial's `<objective>_lo`/`_hi` metrics)
INTERVAL_LABEL = "95% interval (Wilson over images)"


def _save(fig, path: Path, caption: str) -> None:
    """Write ``fig`` with ``caption`` (how its figures were obtained) in small print below it;
    ``bbox_inches="tight"`` grows the image to keep the caption and any clipped title."""
    if caption:
        wrapped = textwrap.fill(caption, width=int(fig.get_figwidth() * 16))
        fig.text(0.01, -0.01, wrapped, ha="left", va="top", fontsize=7.5, color="dimgrey")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def axis_label(objective: Objective) -> str:
    return f"{objective.name} ({'higher' if objective.maximise else 'lower'} is better)"


def axis_limits(values: np.ndarray) -> tuple[float, float]:
    """The data range with a margin (at least ``MIN_SPAN`` wide), so that points are not crowded
    into a corner; accuracies (fractions) never extend past their possible range [0, 1]."""
    lo, hi = float(np.min(values)), float(np.max(values))
    span = max(hi - lo, MIN_SPAN)
    mid = (lo + hi) / 2
    lo, hi = mid - 0.6 * span, mid + 0.6 * span
    if float(np.min(values)) >= 0.0 and float(np.max(values)) <= 1.0:
        lo, hi = max(lo, -MARGIN), min(hi, 1.0 + MARGIN)
    return lo, hi


def mark_unit_range(ax, axis: str, values: np.ndarray) -> None:
    """Where an accuracy axis is zoomed in, say so on the axis label (the full range is 0..1)."""
    lo, hi = axis_limits(values)
    if float(np.min(values)) >= 0.0 and float(np.max(values)) <= 1.0 and (lo > 0 or hi < 1):
        label = getattr(ax, f"get_{axis}label")()
        getattr(ax, f"set_{axis}label")(f"{label}\nzoomed to the data; full range 0..1")


def duplicate_counts(points: np.ndarray) -> np.ndarray:
    """For each row, how many rows have exactly the same objective vector (itself included)."""
    _, inverse, counts = np.unique(points, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.ravel()]


def staircase(points: np.ndarray, maximise: np.ndarray) -> np.ndarray:
    """Vertices of the boundary of the region that the non-dominated subset of 2-D ``points``
    attains, from one end of the front to the other."""
    front = moocore.filter_dominated(points, maximise=maximise)
    sign = np.where(maximise, -1.0, 1.0)
    front = front[np.argsort(front[:, 0] * sign[0])]
    corners = np.column_stack([front[1:, 0], front[:-1, 1]])
    out = np.empty((2 * len(front) - 1, 2))
    out[0::2], out[1::2] = front, corners
    return out


def error_bars(info: FrontInfo, col: int) -> np.ndarray:
    """``(2, n)`` distances from each point down to its interval's low end and up to its high
    end in objective ``col`` (0 where the run logged no interval), as errorbar() takes them."""
    x = info.points[:, col]
    below = np.nan_to_num(x - info.lo[:, col], nan=0.0)
    above = np.nan_to_num(info.hi[:, col] - x, nan=0.0)
    return np.clip(np.vstack([below, above]), 0.0, None)


def extent(info: FrontInfo, col: int) -> np.ndarray:
    """The values an axis of objective ``col`` must show: the points and their intervals' ends."""
    values = np.concatenate([info.points[:, col], info.lo[:, col], info.hi[:, col]])
    return values[np.isfinite(values)]


def has_intervals(info: FrontInfo, cols: list[int]) -> bool:
    """Whether any run logged an interval for any of the objectives ``cols``."""
    return bool(np.isfinite(info.lo[:, cols]).any() or np.isfinite(info.hi[:, cols]).any())


def _group_colours(info: FrontInfo) -> dict[str, tuple]:
    return {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(sorted(set(info.groups)))}


def _hover(info: FrontInfo) -> list[str]:
    return [
        f"run {rid}<br>trial {t}<br>rt {g}<br>"
        + "<br>".join(f"{o.name} = {v:.4f}" for o, v in zip(info.objectives, p))
        + ("<br><b>first front</b>" if r == 0 else "")
        + ("<br><b>knee</b>" if i == info.knee else "")
        for i, (rid, t, g, p, r) in enumerate(
            zip(info.run_ids, info.trial_numbers, info.groups, info.points, info.ranks)
        )
    ]


def _scatter_mpl(ax, info: FrontInfo, cols: list[int]) -> None:
    colours = _group_colours(info)
    front, knee = info.on_front, info.knee
    for group, colour in colours.items():
        mine = np.array([g == group for g in info.groups])
        for sel, kw in (
            (mine & ~front, {"s": 18, "alpha": 0.4}),
            (mine & front, {"s": 55, "edgecolors": "black", "linewidths": 1.2}),
        ):
            ax.scatter(*info.points[sel][:, cols].T, color=colour, **kw)
    # the knee as a ring around its point, so the point's own colour (its RT type) stays visible
    ax.scatter(
        *info.points[knee, cols], marker="o", s=260, facecolors="none", edgecolors="goldenrod",
        linewidths=2.2, zorder=5,
    )
    if len(cols) == 2 and has_intervals(info, cols):
        ax.errorbar(
            *info.points[:, cols].T, xerr=error_bars(info, cols[0]), yerr=error_bars(info, cols[1]),
            fmt="none", ecolor="grey", elinewidth=0.8, alpha=0.6, zorder=1,
        )  # fmt: skip
    if len(cols) == 2:
        # identical objective vectors draw as one marker: say how many runs stand there
        counts = duplicate_counts(info.points[:, cols])
        seen = set()
        for i in np.flatnonzero(counts > 1):
            key = tuple(info.points[i, cols])
            if key not in seen:
                seen.add(key)
                ax.annotate(f"×{counts[i]}", key, xytext=(6, 6), textcoords="offset points", fontsize=8)


def _legend_handles(info: FrontInfo, bars: bool = False) -> list:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker="o", color=c, label=f"rt = {g}")
        for g, c in _group_colours(info).items()
    ]
    handles.append(
        Line2D(
            [],
            [],
            ls="",
            marker="o",
            mfc="white",
            mec="black",
            mew=1.2,
            ms=8,
            label="first Pareto front",
        )
    )
    handles.append(
        Line2D([], [], ls="", marker="o", mfc="none", mec="goldenrod", mew=2.2, ms=15, label="knee")
    )
    if bars:
        handles.append(Line2D([], [], color="grey", lw=0.8, label=f"bars: {INTERVAL_LABEL}"))
    return handles


def front_pairs_png(info: FrontInfo, path: Path, title: str, caption: str = "") -> None:
    """One panel per pair of objectives: every kept run coloured by RT type, the first front
    (in all objectives) outlined in black, the knee ringed, runs at one point counted."""
    pairs = list(combinations(range(len(info.objectives)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 5), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        _scatter_mpl(ax, info, [i, j])
        ax.set_xlabel(axis_label(info.objectives[i]))
        ax.set_ylabel(axis_label(info.objectives[j]))
        ax.set_xlim(axis_limits(extent(info, i)))
        ax.set_ylim(axis_limits(extent(info, j)))
        mark_unit_range(ax, "x", extent(info, i))
        mark_unit_range(ax, "y", extent(info, j))
        ax.grid(alpha=0.3)
    bars = has_intervals(info, list(range(len(info.objectives))))
    # beside the last panel, not inside it: "best" still covered error bars and points
    axes[0][-1].legend(handles=_legend_handles(info, bars), loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       borderaxespad=0, fontsize=8)
    distinct = len(np.unique(info.points[info.on_front], axis=0))
    fig.suptitle(
        f"{title}: {info.on_front.sum()} of {len(info.points)} runs on the first front"
        + (f" ({distinct} distinct point{'s' if distinct > 1 else ''}; ×k marks k runs at one point)"
           if distinct < info.on_front.sum() else "")
        + (f"\nerror bars: {INTERVAL_LABEL}" if bars else "")
    )
    fig.tight_layout()
    _save(fig, path, caption)


def front_3d_png(info: FrontInfo, path: Path, title: str, caption: str = "") -> None:
    """The three objectives in one 3-D view, styled as :func:`front_pairs_png`."""
    fig = plt.figure(figsize=(7, 6.5))
    ax = fig.add_subplot(projection="3d")
    _scatter_mpl(ax, info, [0, 1, 2])
    for k, setter in enumerate((ax.set_xlim, ax.set_ylim, ax.set_zlim)):
        setter(axis_limits(info.points[:, k]))
    ax.set_xlabel(info.objectives[0].name)
    ax.set_ylabel(info.objectives[1].name)
    ax.set_zlabel(info.objectives[2].name)
    ax.legend(handles=_legend_handles(info), loc="upper left", fontsize=8)
    ax.set_title(f"{title}: {info.on_front.sum()} runs on the first front")
    _save(fig, path, caption)


def convergence_png(info: FrontInfo, path: Path, title: str, caption: str = "") -> None:
    """Hypervolume of the runs finished up to each trial, against the trial number."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = info.trial_numbers
    ax.step(x, info.convergence, where="post", color="tab:blue")
    ax.plot(x, info.convergence, "o", ms=3, color="tab:blue")
    ax.set_xlabel("trial number (kept runs only)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no trial 0.5
    ax.set_ylabel("hypervolume")
    ax.set_ylim(0, max(info.hypervolume, 1e-12) * 1.08)
    ref = ", ".join(f"{v:g}" for v in info.ref_point)
    ax.set_title(f"{title}: hypervolume over trials (reference point ({ref}))")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, caption)


def _axes_values(info: FrontInfo) -> list[tuple[str, np.ndarray, list[str] | None]]:
    """Parallel-coordinates axes: (name, values scaled to [0, 1], category names or None)."""
    axes = []
    for name, raw in info.params.items():
        try:
            values, cats = np.array([float(v) for v in raw]), None
        except ValueError:
            cats = sorted(set(raw))
            values = np.array([cats.index(v) for v in raw], dtype=float)
        axes.append((name, values, cats))
    axes += [(o.name, info.points[:, k], None) for k, o in enumerate(info.objectives)]
    return axes


def params_png(info: FrontInfo, path: Path, title: str, caption: str = "") -> None:
    """Parallel coordinates: each varying hyperparameter and each objective is an axis, each run
    a line coloured by RT type; first-front runs are drawn thick."""
    axes = _axes_values(info)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(axes)), 4.8))
    scaled = []
    for k, (name, values, cats) in enumerate(axes):
        lo, hi = values.min(), values.max()
        scaled.append((values - lo) / (hi - lo) if hi > lo else np.full_like(values, 0.5))
        labels = cats if cats else [f"{v:.3g}" for v in np.linspace(lo, hi, 3)]
        ticks = np.linspace(0, 1, len(labels)) if hi > lo else [0.5]
        for t, lab in zip(ticks, labels if hi > lo else labels[:1]):
            ax.text(k + 0.04, t, lab, fontsize=7, va="center")
    columns = np.column_stack(scaled)
    colours = _group_colours(info)
    for row, group, on_front in zip(columns, info.groups, info.on_front):
        ax.plot(
            range(len(axes)),
            row,
            color=colours[group],
            lw=2.2 if on_front else 0.7,
            alpha=0.95 if on_front else 0.35,
        )
    for k in range(len(axes)):
        ax.axvline(k, color="grey", lw=0.8)
    ax.set_xticks(range(len(axes)), [a[0] for a in axes], rotation=30, ha="right")
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(axes) - 0.5)
    ax.legend(
        handles=_legend_handles(info)[:-2],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        title="thick: first front",
        title_fontsize=8,
    )
    ax.set_title(f"{title}: hyperparameters and objectives\n(each axis scaled to its own range)", fontsize=10)
    fig.tight_layout()
    _save(fig, path, caption)


def _compare_colours(cmp: CompareInfo) -> list[tuple]:
    return [PALETTE[i % len(PALETTE)] for i in range(len(cmp.names))]


def compare_png(cmp: CompareInfo, path: Path, caption: str = "") -> None:
    """Overlay of every study's runs and 2-D front in the compared pair of objectives (solid:
    left side of the EAF difference, dashed: right side), next to the EAF difference."""
    maximise = np.array([o.maximise for o in cmp.pair])
    allp = np.vstack(cmp.points)
    xlim, ylim = axis_limits(allp[:, 0]), axis_limits(allp[:, 1])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for i, (name, pts, colour) in enumerate(zip(cmp.names, cmp.points, _compare_colours(cmp))):
        ax.scatter(*pts.T, s=12, alpha=0.35, color=colour)
        style = "-" if i in cmp.left else "--"
        stairs = staircase(pts, maximise).T
        ax.plot(*stairs, style, color=colour, marker="o", ms=4, label=f"{name} [{cmp.labels[i]}]")
        ax2.plot(*stairs, style, color="black", lw=0.8, alpha=0.6)
    ax.set_title("2-D fronts (solid: left side, dashed: right side)")
    ax2.set_title(
        "EAF difference: blue = left better, red = right better"
        if cmp.eaf_diff is not None
        else f"EAF difference not drawn: {cmp.eaf_note}",
        fontsize=9,
    )
    if cmp.eaf_diff is not None:
        norm = plt.Normalize(-1, 1)
        cmap = plt.get_cmap("RdBu")
        for x1, y1, x2, y2, d in cmp.eaf_diff:
            if d == 0:
                continue
            # Infinite far corners run off the plot: clip them to its limits.
            x2 = np.clip(x2, *xlim)
            y2 = np.clip(y2, *ylim)
            ax2.add_patch(
                Rectangle(
                    (min(x1, x2), min(y1, y2)),
                    abs(x2 - x1),
                    abs(y2 - y1),
                    color=cmap(norm(d)),
                    lw=0,
                )
            )
        fig.colorbar(
            plt.cm.ScalarMappable(norm=norm, cmap=cmap),
            ax=ax2,
            label="fraction of left studies minus right studies attaining",
        )
    for a in (ax, ax2):
        a.set_xlim(xlim)
        a.set_ylim(ylim)
        a.set_xlabel(axis_label(cmp.pair[0]))
        a.set_ylabel(axis_label(cmp.pair[1]))
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, caption)


def _plotly_pairs(info: FrontInfo) -> go.Figure:
    pairs = list(combinations(range(len(info.objectives)), 2))
    fig = make_subplots(rows=1, cols=len(pairs))
    hover = np.array(_hover(info))
    colours = _group_colours(info)
    for c, (i, j) in enumerate(pairs, start=1):
        for group, colour in colours.items():
            mine = np.array([g == group for g in info.groups])
            rgb = f"rgb{tuple(int(255 * v) for v in colour)}"
            line = np.where(info.on_front[mine], 2, 0)
            fig.add_scatter(
                x=info.points[mine, i],
                y=info.points[mine, j],
                mode="markers",
                row=1,
                col=c,
                name=f"rt = {group}",
                legendgroup=group,
                showlegend=c == 1,
                marker={
                    "color": rgb,
                    "size": np.where(info.on_front[mine], 11, 6),
                    "line": {"width": line, "color": "black"},
                },
                text=hover[mine],
                hovertemplate="%{text}<extra></extra>",
                error_x=_plotly_bars(info, i, mine),
                error_y=_plotly_bars(info, j, mine),
            )
        fig.update_xaxes(
            title_text=axis_label(info.objectives[i]),
            row=1,
            col=c,
            range=axis_limits(extent(info, i)),
        )
        fig.update_yaxes(
            title_text=axis_label(info.objectives[j]),
            row=1,
            col=c,
            range=axis_limits(extent(info, j)),
        )
    bars = has_intervals(info, list(range(len(info.objectives))))
    fig.update_layout(
        title="Objectives in pairs (black outline: first Pareto front"
        + (f"; error bars: {INTERVAL_LABEL})" if bars else ")")
    )
    return fig


def _plotly_bars(info: FrontInfo, col: int, rows: np.ndarray) -> dict:
    below, above = error_bars(info, col)[:, rows]
    return {"type": "data", "symmetric": False, "array": above, "arrayminus": below,
            "color": "grey", "thickness": 1, "width": 0}


def _plotly_3d(info: FrontInfo) -> go.Figure:
    hover = np.array(_hover(info))
    fig = go.Figure()
    for group, colour in _group_colours(info).items():
        mine = np.array([g == group for g in info.groups])
        fig.add_scatter3d(
            x=info.points[mine, 0],
            y=info.points[mine, 1],
            z=info.points[mine, 2],
            mode="markers",
            name=f"rt = {group}",
            text=hover[mine],
            hovertemplate="%{text}<extra></extra>",
            marker={
                "color": f"rgb{tuple(int(255 * v) for v in colour)}",
                "size": np.where(info.on_front[mine], 7, 3),
                "symbol": np.where(info.on_front[mine], "diamond", "circle"),
            },
        )
    names = [o.name for o in info.objectives]
    fig.update_layout(
        title="3-D view (diamonds: first Pareto front)",
        scene={"xaxis_title": names[0], "yaxis_title": names[1], "zaxis_title": names[2]},
    )
    return fig


def _plotly_params(info: FrontInfo) -> go.Figure:
    dims = []
    for name, values, cats in _axes_values(info):
        dim = {"label": name, "values": values}
        if cats:
            dim.update(tickvals=list(range(len(cats))), ticktext=cats)
        dims.append(dim)
    last = info.objectives[-1]
    return go.Figure(
        go.Parcoords(
            dimensions=dims,
            line={
                "color": info.points[:, -1],
                "colorscale": "Viridis",
                "showscale": True,
                "colorbar": {"title": last.name},
            },
        ),
        layout={"title": f"Hyperparameters and objectives (colour: {last.name})"},
    )


def _plotly_convergence(info: FrontInfo) -> go.Figure:
    fig = go.Figure(
        go.Scatter(
            x=info.trial_numbers,
            y=info.convergence,
            mode="lines+markers",
            line_shape="hv",
            text=list(info.run_ids),
            hovertemplate="trial %{x}<br>hypervolume %{y:.5f}<br>run %{text}<extra></extra>",
        )
    )
    fig.update_layout(
        title="Hypervolume over trials", xaxis_title="trial number", yaxis_title="hypervolume"
    )
    return fig


def _plotly_compare(cmp: CompareInfo) -> go.Figure:
    maximise = np.array([o.maximise for o in cmp.pair])
    fig = go.Figure()
    for i, (name, pts) in enumerate(zip(cmp.names, cmp.points)):
        stairs = staircase(pts, maximise)
        fig.add_scatter(
            x=stairs[:, 0],
            y=stairs[:, 1],
            mode="lines+markers",
            name=f"{name} [{cmp.labels[i]}]",
            line={"dash": "solid" if i in cmp.left else "dash"},
        )
    allp = np.vstack(cmp.points)
    fig.update_layout(
        title="2-D fronts of the compared studies",
        xaxis={"title": axis_label(cmp.pair[0]), "range": axis_limits(allp[:, 0])},
        yaxis={"title": axis_label(cmp.pair[1]), "range": axis_limits(allp[:, 1])},
    )
    return fig


def write_figures(
    info: FrontInfo,
    out_dir: Path,
    title: str,
    cmp: CompareInfo | None = None,
    caption: str = "",
    compare_caption: str = "",
) -> list[str]:
    """Write every figure of a study into ``out_dir``.

    Args:
        info: The study's front information.
        out_dir: Existing directory.
        title: Study name, used in figure titles.
        cmp: Comparison with other studies, or None.
        caption: How the study's objectives were obtained (``analysis.report.figure_caption``),
            printed under every figure of the study and atop the HTML page.
        compare_caption: The same for every compared study, under ``compare.png``.

    Returns:
        Names of the files written: ``front_pairs.png``, ``front_3d.png`` (3 objectives only),
        ``convergence.png``, ``params.png`` (when some hyperparameter varies),
        ``compare.png`` (with ``cmp``) and ``figures.html`` (all of them, interactive).
    """
    out_dir = Path(out_dir)
    pngs = [("front_pairs.png", front_pairs_png, _plotly_pairs)]
    if len(info.objectives) == 3:
        pngs.append(("front_3d.png", front_3d_png, _plotly_3d))
    pngs.append(("convergence.png", convergence_png, _plotly_convergence))
    if info.params:
        pngs.append(("params.png", params_png, _plotly_params))
    figures = []
    for name, draw_png, draw_html in pngs:
        draw_png(info, out_dir / name, title, caption)
        figures.append(draw_html(info))
    written = [name for name, _, _ in pngs]
    if cmp is not None:
        compare_png(cmp, out_dir / "compare.png", compare_caption)
        figures.append(_plotly_compare(cmp))
        written.append("compare.png")
    # One self-contained page: plotly.js is inlined once, so it opens offline and in the MLflow
    # UI's artifact viewer.
    body = "\n".join(
        fig.to_html(full_html=False, include_plotlyjs=(k == 0)) for k, fig in enumerate(figures)
    )
    if caption:
        body = f"<p style='font-family:sans-serif;font-size:13px;color:#444'>{html.escape(caption)}</p>\n{body}"
    page = (
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>{body}</body></html>"
    )
    (out_dir / "figures.html").write_text(page, encoding="utf-8")
    return [*written, "figures.html"]
