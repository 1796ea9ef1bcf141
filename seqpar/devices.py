"""Which GPU a rank uses: the node-local rank picks one, round robin."""
from __future__ import annotations

import os

from ._mpi import MPI
from .comms import resolve_comm

__all__ = ["use_local_device"]


def use_local_device(comm: MPI.Comm | None = None, device: int | None = None) -> int:
    """Make this rank's GPU CuPy's current device and return its id.

    By default, rank r of the ranks that share a node (``comm.Split_type(
    COMM_TYPE_SHARED)``) takes visible device r mod (number of devices), so one
    rank per GPU needs nothing more than as many ranks per node as GPUs. Collective
    over ``comm`` unless ``device`` or ``SEQPAR_DEVICE`` chooses.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The ranks to spread over each node's GPUs; defaults to ``MPI.COMM_WORLD``.
    device : int, optional
        Use this device instead. The environment variable ``SEQPAR_DEVICE`` does
        the same for a whole job; ``CUDA_VISIBLE_DEVICES`` still decides what is
        visible.

    Returns
    -------
    int
        The id of the device now current (among the visible ones).
    """
    import cupy

    if device is None and os.environ.get("SEQPAR_DEVICE", "").strip():
        device = int(os.environ["SEQPAR_DEVICE"])
    count = cupy.cuda.runtime.getDeviceCount()
    if device is None:
        local = resolve_comm(comm).Split_type(MPI.COMM_TYPE_SHARED)
        try:
            device = local.rank % count
        finally:
            local.Free()
    if not 0 <= device < count:
        raise ValueError(f"device {device} does not exist: {count} visible device(s)")
    cupy.cuda.Device(device).use()
    return device
