"""seqpar: exact softmax attention over sequences split across MPI ranks."""
from .devices import use_local_device
from .layout import gather, local_indices, shard
from .strategies.kv_sharded import kv_sharded_attention
from .strategies.local import attention
from .strategies.ring import ring_attention
from .strategies.ulysses import ulysses_attention

__all__ = ["attention", "ring_attention", "kv_sharded_attention", "ulysses_attention",
           "shard", "gather", "local_indices", "use_local_device"]
__version__ = "0.1.0"
