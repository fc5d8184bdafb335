"""Matmuls written the way XLA:CPU's oneDNN matmuls run fastest; plain einsums on GPU / TPU.

Below the models and the attention kernels, which both compute weight-style gradients with them (`jmm.cpu_matmuls`
holds the compiler options and safety check that turn oneDNN on; this module only shapes the dots).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def row_contraction(a, b):
  """a^T b over the rows: a [..., M, P], b [..., M, Q] -> [..., P, Q] (batched over the leading axes).

  This is every weight gradient (x^T dy over the tokens) and attention's dV = P^T dO and dK = dS^T Q. oneDNN, as
  XLA:CPU calls it, reorders a matmul's operands on every call: a left operand whose contracted axis is not its
  minor one is first copied to row-major, a transpose that costs about 3x the blocking copy the right operand
  always gets (ONEDNN_VERBOSE on an S/16 step: 9 ms for fc_out's [3136, 1536] activations, 1.9 ms for a
  [3136, 384] one, 5 ms for a layer's [16, 6, 196, 196] probabilities). XLA makes the left operand a, whatever
  its width. On a CPU, when a is the wider one, this computes (b^T a)^T instead: the transposed copy is of the
  narrower b, and the swap of the small [..., Q, P] result is cheap. The optimization barrier keeps XLA's
  simplifier from folding the swap back into the dot. An S/16 + S/16 SigLIP step's oneDNN reorders fell from
  625 to 416 ms of op time, the step 2-5% faster (in-process A / B, 8 alternating pairs). Elsewhere (GPU, TPU:
  the matmul libraries read transposed operands in place) it is the plain einsum.
  """
  if jax.default_backend() != 'cpu' or a.shape[-1] <= b.shape[-1]:
    return jnp.einsum('...mp,...mq->...pq', a, b)
  return jnp.swapaxes(jax.lax.optimization_barrier(jnp.einsum('...mq,...mp->...qp', b, a)), -1, -2)
