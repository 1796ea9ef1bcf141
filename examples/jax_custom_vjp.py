"""Ring attention as a JAX function with a custom VJP, through DLPack.

seqpar imports no framework. ``jax.custom_vjp`` gives JAX the forward
(seqpar.ring_attention) and the backward (seqpar.ring_attention_backward);
``jax.pure_callback`` runs them outside the trace on the concrete host arrays JAX
hands it, which seqpar reads in place (on a GPU, JAX would copy them to the host
for a callback: there, pass JAX's device arrays to seqpar directly, which views
them as CuPy arrays through DLPack). Run::

    python -m seqpar run -n 2 examples/jax_custom_vjp.py

The gradient of a loss over the whole sequence is checked against JAX's own
softmax attention on the gathered arrays.
"""
import jax
import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

import seqpar

jax.config.update("jax_enable_x64", True)
COMM, LAYOUT = MPI.COMM_WORLD, "zigzag"


def _forward(q, k, v):
    out, lse = seqpar.ring_attention(np.asarray(q), np.asarray(k), np.asarray(v), comm=COMM,
                                     causal=True, layout=LAYOUT, return_lse=True)
    return out, lse


def _backward(dout, q, k, v, out, lse):
    return seqpar.ring_attention_backward(*(np.asarray(x) for x in (dout, q, k, v, out, lse)),
                                          comm=COMM, causal=True, layout=LAYOUT)


@jax.custom_vjp
def ring_attention(q, k, v):
    return ring_attention_fwd(q, k, v)[0]


def ring_attention_fwd(q, k, v):
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((q.shape[0], q.shape[2], q.shape[1]), q.dtype))
    out, lse = jax.pure_callback(_forward, shapes, q, k, v)
    return out, (q, k, v, out, lse)


def ring_attention_bwd(saved, dout):
    q, k, v, out, lse = saved
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    return jax.pure_callback(_backward, shapes, dout, q, k, v, out, lse)


ring_attention.defvjp(ring_attention_fwd, ring_attention_bwd)


def reference(q, k, v):
    s = jnp.einsum("bihd,bjhd->bhij", q, k) / jnp.sqrt(q.shape[-1])
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    return jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(s, axis=-1), v)


def main() -> int:
    n, heads, d = 64 * COMM.size, 4, 32
    rng = np.random.default_rng(0)  # the same global arrays on every rank
    q, k, v, weight = (rng.standard_normal((1, n, heads, d)) for _ in range(4))
    mine = seqpar.local_indices(n, COMM, layout=LAYOUT)

    def local_loss(q, k, v):
        return jnp.sum(ring_attention(q, k, v) * weight[:, mine])

    grads = jax.grad(local_loss, argnums=(0, 1, 2))(*(jnp.asarray(x[:, mine]) for x in (q, k, v)))
    ref = jax.grad(lambda q, k, v: jnp.sum(reference(q, k, v) * weight), argnums=(0, 1, 2))(
        q, k, v)
    worst = 0.0
    for got, want in zip(grads, ref):
        want = np.asarray(want)[:, mine]
        err = float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))
        worst = max(worst, COMM.allreduce(err, op=MPI.MAX))
    if COMM.rank == 0:
        print(f"{COMM.size} rank(s): gradients of q, k, v vs JAX attention: worst relative "
              f"error {worst:.2e}")
    return 0 if worst <= 1e-10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
