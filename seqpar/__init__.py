"""seqpar: exact softmax attention over sequences split across MPI ranks."""
from . import _mpi  # noqa: F401 - first: one clear line where no MPI library loads
from .cache import ShardedKVCache
from .devices import use_local_device
from .layout import gather, local_indices, shard
from .log import _from_environment, log_to_stderr
from .strategies.auto import choose_strategy, sequence_parallel_attention
from .strategies.hybrid import hybrid_attention
from .strategies.kv_sharded import kv_sharded_attention, kv_sharded_attention_backward
from .strategies.local import attention, attention_backward
from .strategies.ring import ring_attention, ring_attention_backward
from .strategies.ulysses import ulysses_attention, ulysses_attention_backward

__all__ = ["attention", "ring_attention", "kv_sharded_attention", "ulysses_attention",
           "attention_backward", "ring_attention_backward", "kv_sharded_attention_backward",
           "ulysses_attention_backward", "hybrid_attention", "sequence_parallel_attention",
           "choose_strategy",
           "shard", "gather", "local_indices", "use_local_device", "ShardedKVCache", "log_to_stderr"]
__version__ = "0.1.0"

_from_environment()  # SEQPAR_LOG=info: the log on stderr without a change to the program
