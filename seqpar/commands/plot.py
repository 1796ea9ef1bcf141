"""The figure of ``seqpar bench --plot``: time and FLOP/s against N and ranks (matplotlib)."""
from __future__ import annotations

import os
from collections import defaultdict

from ._common import UsageError, rate_unit

__all__ = ["draw_bench", "figure_format_problem", "plot_bench", "require_matplotlib"]


def require_matplotlib() -> None:
    """Raise UsageError, saying how to install it, where matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install "seqpar[plot]"') from None


def figure_format_problem(path: str) -> str | None:
    """Why matplotlib cannot write a figure to ``path`` (its suffix), or None."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = os.path.splitext(path)[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        return f"matplotlib writes no .{suffix} files (.png, .pdf or .svg, for example)"
    return None


def plot_bench(records: list[dict], path: str) -> str:
    """Draw :func:`draw_bench`'s figure and save it to ``path``.

    Parameters
    ----------
    records : list of dict
        From ``seqpar bench`` (the ``records`` of its JSON).
    path : str
        The image file; its suffix picks the format (``.png``, ``.svg``, ``.pdf``); without
        one, ``.png`` is added.

    Returns
    -------
    str
        The file written.
    """
    if not os.path.splitext(path)[1]:
        path += ".png"
    draw_bench(records).savefig(path, dpi=120)
    return path


def draw_bench(records: list[dict]):
    """Time (log-log) and rate against N, one line per setting, peers dashed; and time
    against the number of ranks, one line per N, when the records hold several.

    Parameters
    ----------
    records : list of dict
        Keys ``strategy``, ``seq``, ``median_s``, ``flops``, ``ranks``, ``dtype``,
        ``causal``, ``device``, and where known ``threads`` (per rank) and ``device_name``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    # Figure without pyplot: no GUI backend, no global state, works on any node.
    from matplotlib.figure import Figure

    ours = [r for r in records if r.get("strategy", "ring_attention") == "ring_attention"]
    # settings shared by every record go in the title; those that vary, in the labels
    shared = [name for name in ("heads", "head_dim", "layout")
              if len({r[name] for r in ours or records}) == 1]
    lines = defaultdict(list)
    for r in records:
        lines[_label(r, shared)].append(r)
    rank_counts = sorted({r["ranks"] for r in ours})
    figure = Figure(figsize=(15 if len(rank_counts) > 1 else 10, 4), layout="constrained")
    panels = figure.subplots(1, 3 if len(rank_counts) > 1 else 2)
    time_axes, rate_axes = panels[0], panels[1]
    scale, unit = rate_unit(max(r["flops"] / r["median_s"] for r in records))
    seconds = 1.0 if max(r["median_s"] for r in records) >= 1 else 1e-3
    for label, rows in lines.items():
        rows.sort(key=lambda r: r["seq"])
        style = "o-" if rows[0].get("strategy", "ring_attention") == "ring_attention" else "s--"
        seqs = [r["seq"] for r in rows]
        time_axes.plot(seqs, [r["median_s"] / seconds for r in rows], style, label=label)
        rate_axes.plot(seqs, [r["flops"] / r["median_s"] / scale for r in rows], style,
                       label=label)
    seqs = sorted({r["seq"] for r in records})
    for axes in (time_axes, rate_axes):
        _integer_ticks(axes.xaxis, seqs, _tokens)
        axes.set_xlabel("sequence length N (tokens, all ranks)")
        axes.grid(True, alpha=0.3)
    _log_time(time_axes, seconds)
    rate_axes.set_ylabel(f"{unit} (all ranks, median)")
    rate_axes.set_ylim(bottom=0)
    rate_axes.legend(loc="best", fontsize="small")
    if len(rank_counts) > 1:
        _by_ranks(panels[2], ours, rank_counts, shared, seconds)
    figure.suptitle("seqpar ring_attention" + "".join(
        f", {name}={(ours or records)[0][name]}" for name in shared))
    return figure


def _label(r: dict, shared: list) -> str:
    """Who ran it (strategy, ranks x threads or GPUs, device) and the varying settings."""
    device = r.get("device_name") or r["device"]
    threads = r.get("threads")
    threads = f" \u00d7 {threads} thread{'s' if threads > 1 else ''}" if threads else ""
    if r.get("strategy", "ring_attention") != "ring_attention":
        who = f"torch SDPA, 1 process{threads}, {device}"
    elif r["device"] == "gpu":
        who = f"{r['ranks']} \u00d7 {device}"
    else:
        who = f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}{threads}, {device}"
    return (f"{who}, {r['dtype']}{', causal' if r['causal'] else ''}"
            + "".join(f", {name}={r[name]}" for name in ("heads", "head_dim", "layout")
                      if name not in shared and r.get(name) is not None))


def _by_ranks(axes, ours: list, rank_counts: list, shared: list, seconds: float) -> None:
    """Time against ranks (strong scaling), one line per N and setting."""
    lines = defaultdict(list)
    for r in ours:  # threads per rank change with the ranks on a node: not in the key
        label = (f"N={_tokens(r['seq'])}, {r.get('device_name') or r['device']}, {r['dtype']}"
                 f"{', causal' if r['causal'] else ''}"
                 + "".join(f", {name}={r[name]}" for name in ("heads", "head_dim", "layout")
                           if name not in shared))
        lines[label].append(r)
    for label, rows in lines.items():
        if len(rows) > 1:  # one point is no scaling
            rows.sort(key=lambda r: r["ranks"])
            axes.plot([r["ranks"] for r in rows], [r["median_s"] / seconds for r in rows],
                      "o-", label=label)
    _integer_ticks(axes.xaxis, rank_counts, str)
    axes.set_xlabel("ranks")
    _log_time(axes, seconds)
    axes.grid(True, alpha=0.3)
    if axes.lines:
        axes.legend(loc="best", fontsize="small")


def _integer_ticks(axis, values: list, text) -> None:
    """A log2 axis with one labelled tick per measured value and no minor ticks."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    axis.axes.set_xscale("log", base=2)
    axis.set_major_locator(FixedLocator(values))
    axis.set_major_formatter(FixedFormatter([text(v) for v in values]))
    axis.set_minor_locator(NullLocator())


def _log_time(axes, seconds: float) -> None:
    """A log time axis in units of ``seconds`` (1 or 1e-3) with ticks at 1, 2 and 5 of
    each decade, plainly written, and no labels on the minor ticks (matplotlib labels
    those on short ranges, over each other)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_ylabel(f"time per call ({'s' if seconds == 1 else 'ms'}, median)")


def _tokens(n: int) -> str:
    """16384 -> "16k", 1048576 -> "1M"; other lengths as they are."""
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)
