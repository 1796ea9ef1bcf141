"""Choosing a strategy from the shapes, the heads and the number of ranks."""
from __future__ import annotations

from .. import comms
from .._interop import accepts_dlpack, raise_unconvertible
from .._typing import Array, Comm, Output
from ..comms import resolve_comm
from ..validation import report_failure
from ._prepare import check_qkv_format, heads_axis
from .hybrid import hybrid_attention
from .kv_sharded import kv_sharded_attention
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["choose_strategy", "communication_per_token", "sequence_parallel_attention"]

STRATEGIES = ("auto", "ring", "ulysses", "hybrid", "kv_sharded")


def communication_per_token(ranks: int, heads: int, kv_heads: int, ulysses_size: int) -> float:
    """Values (of head_dim elements each) a rank sends per local token in one forward.

    U = ``ulysses_size``: the all-to-alls move q, k, v there and out back, of which
    (U - 1) / U leaves the rank; the ring then sends the group's K/V to the other
    P/U - 1 groups, (P/U - 1) * 2 * Hk values per token (the group holds U times the
    tokens, for Hk/U heads). U = 1 is the ring, U = P is Ulysses.
    """
    u = ulysses_size
    return (u - 1) / u * (2 * heads + 2 * kv_heads) + (ranks // u - 1) * 2 * kv_heads


def choose_strategy(ranks: int, heads: int, kv_heads: int, *, queries: str = "sharded",
                    window=None) -> tuple[str, int]:
    """The strategy :func:`sequence_parallel_attention` runs, and its Ulysses group size.

    - Replicated queries (decoding: every rank holds the same queries and a slice of
      the K/V cache): ``kv_sharded``.
    - A sliding window: ``ring``, which exchanges blocks with the ranks the window
      reaches only.
    - Otherwise the group size U (a divisor of P that divides both head counts) with
      the least communication per token
      (:func:`~seqpar.strategies.auto.communication_per_token`); ties go
      to the smaller U, whose transfers overlap compute. U = 1 is ``ring``, U = P is
      ``ulysses``, anything between ``hybrid``.

    Parameters
    ----------
    ranks : int
        P, the number of ranks.
    heads, kv_heads : int
        Heads of q and of k/v.
    queries : {"sharded", "replicated"}
        As for :func:`sequence_parallel_attention`.
    window : (left, right), optional
        The sliding window, if any.

    Returns
    -------
    strategy : {"ring", "ulysses", "hybrid", "kv_sharded"}
    ulysses_size : int
        U: 1 for ``ring`` and ``kv_sharded``, P for ``ulysses``.
    """
    if queries not in ("sharded", "replicated"):
        raise ValueError(f"queries must be 'sharded' or 'replicated', got {queries!r}")
    if queries == "replicated":
        return "kv_sharded", 1
    if window is not None:
        return "ring", 1
    sizes = [u for u in range(1, ranks + 1)
             if ranks % u == 0 and heads % u == 0 and kv_heads % u == 0]
    best = min(sizes, key=lambda u: (communication_per_token(ranks, heads, kv_heads, u), u))
    if best == 1:
        return "ring", 1
    return ("ulysses" if best == ranks else "hybrid"), best


@accepts_dlpack("q", "k", "v")
def sequence_parallel_attention(q: Array, k: Array, v: Array, *, comm: Comm | None = None,
                                strategy: str = "auto", queries: str = "sharded",
                                ulysses_size: int | None = None, stats: dict | None = None,
                                qkv_format: str = "bshd", **options) -> Output:
    """Attention over a sequence split across ranks, by the strategy that suits it.

    Parameters
    ----------
    q, k, v : this rank's arrays, as the chosen strategy takes them
    comm : mpi4py.MPI.Comm, optional
    strategy : {"auto", "ring", "ulysses", "hybrid", "kv_sharded"}
        "auto" applies :func:`choose_strategy` (the same choice on every rank).
    queries : {"sharded", "replicated"}
        Whether each rank holds its own slice of the queries (training, prefill) or
        every rank the same queries (decoding against a sharded K/V cache).
    ulysses_size : int, optional
        The group size for ``strategy="hybrid"`` (chosen by the rule for "auto").
    stats : dict, optional
        Filled with "strategy" and "ulysses_size".
    qkv_format : {"bshd", "bhsd"}
        The order of the axes of q, k, v and out: (B, S, H, D), or (B, H, S, D),
        PyTorch's (see :func:`seqpar.ring_attention`); the heads the choice counts
        are read from the axis it names.
    **options
        Keywords of the chosen strategy (causal, softmax_scale, layout, return_lse,
        transport, window, seqlens, check_finite, ...).

    Returns
    -------
    out : array of q's type, shape and dtype; (out, lse) when ``return_lse``.
    """
    try:
        chosen, ulysses_size = _pick(comm, q, k, strategy, queries, ulysses_size, qkv_format,
                                     options)
    except Exception as exc:  # noqa: BLE001 - every rank raises, not this one alone
        # the other ranks are in their strategy's agreement: report there, so they raise
        # the same error (a choice that differs between ranks is caught there as well)
        with comms.call(comm, "sequence_parallel_attention", options.get("tag")) as context:
            report_failure(context.comm, "sequence_parallel_attention", exc)
    if stats is not None:
        stats.update(strategy=chosen, ulysses_size=ulysses_size)
    # what the choice rests on, compared across ranks before the strategy's own settings
    reasons = {"qkv_format": qkv_format, "strategy": strategy, "queries": queries,
               "heads of q and k/v": (q.shape[heads_axis(qkv_format)],
                                      k.shape[heads_axis(qkv_format)]),
               "window": options.get("window"), "chosen strategy": (chosen, ulysses_size)}
    with comms.dispatching("sequence_parallel_attention", reasons):
        if chosen == "hybrid":
            return hybrid_attention(q, k, v, ulysses_size=ulysses_size, comm=comm,
                                    qkv_format=qkv_format, **options)
        call = {"ring": ring_attention, "ulysses": ulysses_attention,
                "kv_sharded": kv_sharded_attention}[chosen]
        return call(q, k, v, comm=comm, qkv_format=qkv_format, **options)


def _pick(comm, q, k, strategy, queries, ulysses_size, qkv_format,
          options) -> tuple[str, int]:
    """The strategy and its Ulysses group size, from this rank's arguments."""
    check_qkv_format(qkv_format)  # before the choice it orders the axes of
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    raise_unconvertible(q, k)
    size = resolve_comm(comm).size
    if strategy == "auto":
        for name, x in (("q", q), ("k", k)):
            if getattr(x, "ndim", None) not in (3, 4):
                raise TypeError(f"{name} must be an array of 3 or 4 dimensions (seq, heads, "
                                f"head_dim) or (batch, seq, heads, head_dim), got {x!r:.80}")
        axis = heads_axis(qkv_format)
        strategy, chosen = choose_strategy(size, q.shape[axis], k.shape[axis], queries=queries,
                                           window=options.get("window"))
        ulysses_size = chosen if strategy == "hybrid" else ulysses_size
    if strategy == "hybrid" and ulysses_size is None:
        raise ValueError("strategy 'hybrid' needs ulysses_size")
    return strategy, (ulysses_size if strategy == "hybrid" else
                      size if strategy == "ulysses" else 1)
