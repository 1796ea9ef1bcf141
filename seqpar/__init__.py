"""seqpar: exact softmax attention over sequences split across MPI ranks."""
from . import _mpi  # noqa: F401 - first: one clear line where no MPI library loads
from . import graphs  # noqa: F401 - seqpar.graphs.release_graph_memory()
from .cache import ShardedKVCache
from .devices import use_local_device
from .layout import gather, local_indices, shard
from .log import _from_environment, log_to_stderr
from .plans import AttentionPlan
from .strategies.auto import choose_strategy, sequence_parallel_attention
from .strategies.hybrid import hybrid_attention, hybrid_attention_backward
from .strategies.kv_plan import KVShardedPlan
from .strategies.kv_sharded import kv_sharded_attention, kv_sharded_attention_backward
from .strategies.local import attention, attention_backward
from .strategies.ring import ring_attention, ring_attention_backward
from .strategies.ulysses import ulysses_attention, ulysses_attention_backward

__all__ = [
    "AttentionPlan",
    "KVShardedPlan",
    "ShardedKVCache",
    "attention",
    "attention_backward",
    "choose_strategy",
    "gather",
    "hybrid_attention",
    "hybrid_attention_backward",
    "kv_sharded_attention",
    "kv_sharded_attention_backward",
    "local_indices",
    "log_to_stderr",
    "ring_attention",
    "ring_attention_backward",
    "sequence_parallel_attention",
    "shard",
    "ulysses_attention",
    "ulysses_attention_backward",
    "use_local_device",
]
__version__ = "0.1.0"

_from_environment()  # SEQPAR_LOG=info: the log on stderr without a change to the program
