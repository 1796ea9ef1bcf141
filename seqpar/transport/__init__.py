"""Moving buffers between ranks; transports know nothing of attention."""
from .mpi import RingExchange, allreduce

__all__ = ["RingExchange", "allreduce"]
