"""Mesh axis names, and which of a mesh's axes split the batch: the one definition every layer imports.

Kernels shard themselves over the batch (`jax.shard_map` around a Pallas call), so they need the names of the mesh
axes that split it; `jmm.kernels` imports nothing from jmm outside itself, hence this module here rather than in
`jmm.parallel` (which builds the mesh and re-exports these names). The objectives and the MoE layers, below
`jmm.parallel` too, read the batch axes of the mesh in context through `batch_axes()`.
"""
from __future__ import annotations

import jax

# Mesh axes that split the batch, in mesh order: all but 'tensor', which replicates it (jmm.parallel's docstring).
BATCH_AXES = ('data', 'fsdp', 'expert')


def batch_axes(mesh=None) -> tuple[str, ...]:
  """The axes of `mesh` (default: the mesh in context, see `jax.set_mesh`) that split the batch, in mesh order;
  () outside any mesh."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty:
    return ()
  return tuple(a for a in mesh.axis_names if a in BATCH_AXES)
