"""What every strategy does around its work: local checks, 3-D input, the layout of
the axes (``qkv_format``), scale, output."""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .._arrays import accumulation_dtype, array_module, native
from .._interop import raise_unconvertible
from ..local import kernel_for
from ..merge import carried_lse, new_carry

__all__ = ["Prepared", "prepare", "check_finite_arrays", "check_key_lengths",
           "public_lse_dtype", "check_sequence_inputs", "QKV_FORMATS", "accepts_qkv_format",
           "check_qkv_format", "heads_axis"]

# the order of the axes of q, k, v (and out, dout, dq, dk, dv), TransformerEngine's names:
# (batch, seq, heads, head_dim) is what the strategies compute on; (batch, heads, seq,
# head_dim) is PyTorch's (SDPA, transformers), read as a transposed view of the same memory
QKV_FORMATS = ("bshd", "bhsd")


def accepts_qkv_format(*names: str, returns: str = "out"):
    """Decorate a public function with a ``qkv_format`` keyword (which it must take).

    With ``qkv_format="bhsd"`` the arrays ``names`` come in as (B, H, S, D) (3-D: (H, S,
    D)) and are passed on as their (B, S, H, D) views (axes -3 and -2 swapped: no copy);
    what comes back is swapped back the same way: ``returns="out"`` the output (the
    first of a tuple; lse keeps its (B, H, S) shape), ``returns="gradients"`` each of
    dq, dk, dv. The function still gets ``qkv_format`` and checks it with its arguments
    (:func:`seqpar.validation.check_attention_inputs`): any other value is passed on
    untouched and raises there, on every rank, and the setting joins those the ranks
    agree on.
    """
    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if not _transposed(kwargs.get("qkv_format")):
                return function(*args, **kwargs)  # bshd, or a bad value the check raises
            bound = signature.bind(*args, **kwargs)
            for name in names:
                bound.arguments[name] = _swap(bound.arguments.get(name))
            result = function(*bound.args, **bound.kwargs)
            if returns == "gradients":
                return tuple(_swap(g) for g in result)
            if isinstance(result, tuple):
                return (_swap(result[0]),) + result[1:]
            return _swap(result)

        return wrapper

    return decorate


def check_qkv_format(qkv_format) -> str:
    """ValueError naming ``qkv_format`` unless it is one of :data:`QKV_FORMATS`."""
    if not (isinstance(qkv_format, str) and qkv_format in QKV_FORMATS):
        raise ValueError(f"qkv_format must be one of {QKV_FORMATS}, got {qkv_format!r}")
    return qkv_format


def _transposed(qkv_format) -> bool:
    return isinstance(qkv_format, str) and qkv_format == "bhsd"


def _swap(x):
    """(B, H, S, D) <-> (B, S, H, D) as a view; anything else as it is (the argument
    check names what is wrong with it)."""
    if getattr(x, "ndim", None) in (3, 4) and hasattr(x, "swapaxes"):
        return x.swapaxes(-3, -2)
    return x


def heads_axis(qkv_format) -> int:
    """The axis of the heads in arrays of ``qkv_format`` (of a bad value: bshd's, the
    check raises later)."""
    return -3 if _transposed(qkv_format) else -2


@dataclass(frozen=True)
class Prepared:
    q: object
    k: object
    v: object
    scale: float
    squeeze: bool  # the input was 3-D: drop the batch axis again on the way out
    xp: ModuleType
    kernel: ModuleType

    @property
    def accumulator(self):
        return accumulation_dtype(self.q.dtype)

    def new_lse(self, rows: int, heads: int | None = None):
        """An empty carry for ``rows`` queries of each head (all heads of q unless
        ``heads``), in the form this backend's kernels merge into (seqpar.merge)."""
        batch, _, hq, _ = self.q.shape
        return new_carry(self.xp, (batch, hq if heads is None else heads, rows),
                         split=self.kernel.SPLIT_CARRY)

    def finish(self, out, lse, return_lse):
        """Cast to q's dtype and lse to its public dtype, drop the batch axis of 3-D
        input, attach lse if asked."""
        if out.dtype != self.q.dtype:
            out = out.astype(self.q.dtype)
        lse = carried_lse(lse)
        if self.squeeze:
            out, lse = out[0], lse[0]
        if not return_lse:
            return out
        return out, lse.astype(public_lse_dtype(self.q.dtype), copy=False)


    def extras(self, *arrays):
        """The backward's extra arrays (dout, out, lse), 3-D input promoted like q, in
        native byte order."""
        return tuple(native(x[None] if self.squeeze else x) for x in arrays)

    def finish_gradients(self, dq, dk, dv):
        """Gradients in the dtypes of q, k, v, without the batch axis of 3-D input."""
        grads = tuple(g if g.dtype == self.q.dtype else g.astype(self.q.dtype)
                      for g in (dq, dk, dv))
        return tuple(g[0] for g in grads) if self.squeeze else grads


def public_lse_dtype(dtype) -> np.dtype:
    """float64 for float64 input, float32 otherwise (DESIGN: lse's dtype)."""
    return accumulation_dtype(dtype)


def prepare(q, k, v, softmax_scale) -> Prepared:
    """Inputs already checked by :func:`seqpar.validation.check_attention_inputs`; read
    in native byte order (a copy of any array that is not)."""
    q, k, v = native(q), native(k), native(v)
    squeeze = q.ndim == 3
    if squeeze:
        q, k, v = q[None], k[None], v[None]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    xp = array_module(q)
    return Prepared(q, k, v, scale, squeeze, xp, kernel_for(xp))


def check_finite_arrays(**arrays) -> None:
    """Raise ValueError naming the first array that holds NaN or Inf.

    One pass over each array; on the GPU it waits for one boolean per array.
    """
    for name, x in arrays.items():
        if x is None or x.size == 0:
            continue
        xp = array_module(x)
        if not bool(xp.isfinite(x).all()):
            raise ValueError(f"{name} holds NaN or Inf (check_finite=True)")


def check_key_lengths(key_lengths, batch: int, keys: int, xp):
    """Local check of ``key_lengths=``; returns it as an int array on q's device.

    Host values are checked (0 <= L <= keys); a CuPy array is only checked for shape
    and dtype (its values would cost a device sync): the kernel clamps them.
    """
    raise_unconvertible(key_lengths)
    if key_lengths is None:
        return None
    device_array = xp is not np and isinstance(key_lengths, xp.ndarray)
    lengths = key_lengths if device_array else np.asarray(key_lengths)
    if lengths.ndim != 1 or lengths.shape[0] != batch:
        raise ValueError(f"key_lengths must have shape ({batch},) (one per batch row), "
                         f"got {tuple(lengths.shape)}")
    if not np.issubdtype(lengths.dtype, np.integer):
        raise TypeError(f"key_lengths must hold integers, got dtype {lengths.dtype}")
    if not device_array:
        if xp is not np and xp.cuda.get_current_stream().is_capturing():
            raise TypeError("key_lengths: host values would be frozen into the CUDA graph being "
                            "captured; pass a CuPy int32 array and update it in place between "
                            "replays")
        if lengths.size and (lengths.min() < 0 or lengths.max() > keys):
            raise ValueError(f"key_lengths must lie in [0, {keys}] (this rank's keys), "
                             f"got {lengths.tolist()}")
        return np.ascontiguousarray(lengths, dtype=np.int32) if xp is np else \
            xp.asarray(lengths, dtype=np.int32)
    return xp.ascontiguousarray(lengths, dtype=np.int32)


def check_sequence_inputs(qkv, extra_inputs, *, layout, heads_divisor=None,
                          same_length=False, check_finite=False, **options) -> dict:
    """Local checks of a sequence-parallel call (forward, or backward when
    ``extra_inputs`` is (dout, out, lse)): the arguments, the layout and its lengths,
    and heads divisible by ``heads_divisor`` where the heads are split (Ulysses).

    Returns the settings ranks must share; raises naming the argument.
    """
    from ..layout import LAYOUTS
    from ..validation import check_attention_inputs, check_backward_inputs

    q, k, v = qkv
    options.update(layout=layout, check_finite=check_finite)
    if extra_inputs is None:
        settings = check_attention_inputs(q, k, v, **options)
    else:
        settings = check_backward_inputs(extra_inputs[0], q, k, v, *extra_inputs[1:], **options)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    s, sk = settings["q length"], settings["k length"]
    if same_length and s != sk:
        raise ValueError(f"q length {s} and k length {sk} differ")
    if layout == "zigzag" and (s % 2 or sk % 2):
        raise ValueError(f"zigzag layout needs even local lengths (the global length divisible "
                         f"by twice the ranks), got q length {s}, k length {sk}")
    if heads_divisor is not None:
        for name in ("heads of q", "heads of k/v"):
            if settings[name] % heads_divisor:
                raise ValueError(f"{name} ({settings[name]}) must be a multiple of the "
                                 f"number of ranks the heads are split over ({heads_divisor})")
    if check_finite:
        check_finite_arrays(q=q, k=k, v=v)
    return settings
