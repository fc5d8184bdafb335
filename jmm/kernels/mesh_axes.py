"""Mesh axis names that code below `jmm.parallel` needs: the one definition every layer imports.

Kernels shard themselves over the batch (`jax.shard_map` around a Pallas call), so they need the names of the mesh
axes that split it; `jmm.kernels` imports nothing from jmm outside itself, hence this module here rather than in
`jmm.parallel` (which builds the mesh and re-exports these names).
"""
from __future__ import annotations

# Mesh axes that split the batch, in mesh order: all but 'tensor', which replicates it (jmm.parallel's docstring).
BATCH_AXES = ('data', 'fsdp', 'expert')
