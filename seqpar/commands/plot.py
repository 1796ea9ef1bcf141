"""The figure of ``seqpar bench --plot``: time and TFLOP/s against N (matplotlib)."""
from __future__ import annotations

import os
from collections import defaultdict

from ._common import UsageError

__all__ = ["require_matplotlib", "figure_format_problem", "plot_bench"]


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
    """Draw time (log-log) and TFLOP/s against N, one line per setting; save to ``path``.

    Parameters
    ----------
    records : list of dict
        From ``seqpar bench`` (the ``records`` of its JSON): keys ``seq``, ``median_s``,
        ``tflops``, ``ranks``, ``dtype``, ``causal``, ``device``.
    path : str
        The image file; its suffix picks the format (``.png``, ``.svg``, ``.pdf``); without
        one, ``.png`` is added.

    Returns
    -------
    str
        The file written.
    """
    # Figure without pyplot: no GUI backend, no global state, works on any node.
    from matplotlib.figure import Figure

    # settings shared by every record go in the title; those that vary, in the labels
    shared = [name for name in ("heads", "head_dim", "layout")
              if len({r[name] for r in records}) == 1]
    lines = defaultdict(list)
    for r in records:
        label = (f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}, {r['device']}, "
                 f"{r['dtype']}{', causal' if r['causal'] else ''}"
                 + "".join(f", {name}={r[name]}" for name in ("heads", "head_dim", "layout")
                           if name not in shared))
        lines[label].append(r)
    figure = Figure(figsize=(10, 4), layout="constrained")
    time_axes, rate_axes = figure.subplots(1, 2)
    for label, rows in lines.items():
        rows.sort(key=lambda r: r["seq"])
        seqs = [r["seq"] for r in rows]
        time_axes.plot(seqs, [r["median_s"] for r in rows], "o-", label=label)
        rate_axes.plot(seqs, [r["tflops"] for r in rows], "o-", label=label)
    for axes in (time_axes, rate_axes):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("sequence length N (tokens, all ranks)")
        axes.grid(True, which="both", alpha=0.3)
    time_axes.set_yscale("log")
    time_axes.set_ylabel("time per call (s, median)")
    rate_axes.set_ylabel("TFLOP/s (all ranks)")
    rate_axes.set_ylim(bottom=0)
    rate_axes.legend(loc="best", fontsize="small")
    figure.suptitle("seqpar ring_attention" + "".join(
        f", {name}={records[0][name]}" for name in shared))
    if not os.path.splitext(path)[1]:
        path += ".png"
    figure.savefig(path, dpi=120)
    return path
