"""Moving buffers between ranks; transports know nothing of attention."""
from .mpi import RingExchange, allreduce, alltoall

__all__ = ["RingExchange", "allreduce", "alltoall"]
