"""Mesh, logical-axis rules, sharded state and global batches: how one config runs on 1 device or a pod.

The mesh has named axes (config.mesh, default `[('data', -1), ('fsdp', 1), ('tensor', 1)]`, -1 = the rest):

  data    pure data parallelism: parameters replicated, the batch split.
  fsdp    fully sharded data parallelism (ZeRO-3): the batch split *and* parameters and optimizer state split
          over their 'embed' dimension; XLA all-gathers each weight where it is used and reduce-scatters its
          gradient. Memory per device for the state falls as 1/fsdp.
  tensor  Megatron-style tensor parallelism: attention heads and MLP hidden units split; activations of the
          residual stream stay replicated over it. Worth it only when one layer's weights are large.
  expert  experts of a mixture-of-experts layer (when present); the batch is split over it elsewhere.

Decisions (written down so they are not re-litigated per model):
  - The batch is split over every axis but 'tensor' (BATCH_AXES), so 'data' and 'fsdp' differ only in what they
    do to parameters; a run can move between them without touching its data pipeline.
  - Parameters are placed by logical names (models/layers.py) through LOGICAL_RULES. Flax assigns rules in order
    and never reuses a mesh axis within one array, so 'batch' (first) takes 'fsdp' for activations and the
    later 'embed' -> 'fsdp' rule applies only to parameters: FSDP for weights, no sharding of the residual
    stream's width.
  - A dimension the mesh axis does not divide (a 3-wide head count on tensor=2, a vocabulary of 1001) stays
    replicated rather than failing: sharding is an optimisation, never a reason a config cannot run.
  - State is created already sharded (`jax.jit(init, out_shardings=...)`): a model too big for one device never
    exists unsharded anywhere.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jmm.errors import MeshError  # noqa: F401  (re-exported)
from jmm.kernels.mesh_axes import BATCH_AXES  # Mesh axes that split the batch (all but 'tensor').
from jmm.kernels.mesh_axes import batch_axes

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')
DEFAULT_MESH = (('data', -1), ('fsdp', 1), ('tensor', 1))

# Logical axis name (models/layers.py) -> mesh axis, in priority order (see the module docstring).
LOGICAL_RULES = (
    ('batch', BATCH_AXES),
    ('expert', 'expert'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('out', 'tensor'),
    ('length', None),
    ('kv', None),
    ('layers', None),
    ('probe', None),
    ('patch_height', None),
    ('patch_width', None),
    ('conv_in', None),
)


# ---------------------------------------------------------------------------------------------------------
# Multi-host start-up.
# ---------------------------------------------------------------------------------------------------------
def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts `jax.distributed` when this is one process of many; a no-op for a single process.

  Explicit arguments (the --coordinator_address/--num_processes/--process_id flags, or the environment
  variables JMM_COORDINATOR_ADDRESS, JMM_NUM_PROCESSES, JMM_PROCESS_ID that launch/local_multiprocess.sh sets)
  win; otherwise JAX's own cluster detection runs where it knows the environment: Cloud TPU pods (the TPU
  metadata server; JMM_DISTRIBUTED=auto asks for it, as launch/tpu_pod.sh and launch/gke.sh do), SLURM (SLURM_JOB_ID with more than one task) and Open MPI / mpirun. On CPU the cross-process
  collectives go through gloo.
  """
  coordinator_address = coordinator_address or os.environ.get('JMM_COORDINATOR_ADDRESS') or None
  num_processes = num_processes or _env_int('JMM_NUM_PROCESSES')
  if process_id is None:
    process_id = _env_int('JMM_PROCESS_ID')
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  auto = os.environ.get('JMM_DISTRIBUTED', '') == 'auto'  # Set by launch/tpu_pod.sh and launch/gke.sh.
  slurm = int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1
  tpu_pod = bool(os.environ.get('TPU_WORKER_HOSTNAMES', '').count(','))
  mpi = int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1
  if not (explicit or auto or slurm or tpu_pod or mpi):
    return
  if explicit and (coordinator_address is None or not num_processes or process_id is None):
    raise MeshError('multi-process run needs all of --coordinator_address, --num_processes and --process_id '
                    f'(got {coordinator_address!r}, {num_processes!r}, {process_id!r})')
  if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info('jax.distributed: process %d of %d, %d local devices of %d', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, '') else None


# ---------------------------------------------------------------------------------------------------------
# The mesh.
# ---------------------------------------------------------------------------------------------------------
def parse_mesh(spec) -> tuple[tuple[str, int], ...]:
  """config.mesh -> ((name, size), ...). Accepts pairs [('data', -1), ('fsdp', 2)] or a string 'data=-1,fsdp=2'."""
  if spec is None or spec == '' or spec == ():
    return DEFAULT_MESH
  if isinstance(spec, str):
    pairs = []
    for item in spec.split(','):
      name, sep, size = item.strip().partition('=')
      if not sep:
        raise MeshError(f'config.mesh={spec!r}: each entry must look like name=size, e.g. "data=-1,fsdp=2"')
      pairs.append((name.strip(), size.strip()))
  else:
    pairs = [tuple(p) for p in spec]
  out = []
  for pair in pairs:
    if len(pair) != 2:
      raise MeshError(f'config.mesh entry {pair!r} must be a (name, size) pair')
    name, size = pair
    if name not in MESH_AXES:
      raise MeshError(f'config.mesh: unknown axis {name!r}; known: {", ".join(MESH_AXES)}')
    try:
      size = int(size)
    except (TypeError, ValueError):
      raise MeshError(f'config.mesh: axis {name!r} has size {size!r}; expected an integer (-1 = the rest)') from None
    if size == 0 or size < -1:
      raise MeshError(f'config.mesh: axis {name!r} has size {size}; expected a positive integer or -1')
    out.append((name, size))
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise MeshError(f'config.mesh names an axis twice: {names}')
  if sum(s == -1 for _, s in out) > 1:
    raise MeshError(f'config.mesh: at most one axis may be -1 (the rest), got {out}')
  return tuple(out)


def mesh_shape(spec, num_devices: int) -> dict[str, int]:
  """Resolves -1 and checks the product against `num_devices`; returns {axis name: size} in mesh order."""
  pairs = parse_mesh(spec)
  fixed = math.prod(s for _, s in pairs if s != -1)
  if any(s == -1 for _, s in pairs):
    if num_devices % fixed:
      raise MeshError(f'config.mesh={_fmt(pairs)}: the fixed axes multiply to {fixed}, which does not divide '
                      f'the {num_devices} devices')
    pairs = tuple((n, num_devices // fixed if s == -1 else s) for n, s in pairs)
  elif fixed != num_devices:
    raise MeshError(f'config.mesh={_fmt(pairs)} has {fixed} devices but there are {num_devices}; make the sizes '
                    f'multiply to {num_devices} or set one axis to -1')
  return dict(pairs)


def _fmt(pairs) -> str:
  return ','.join(f'{n}={s}' for n, s in pairs)


def make_mesh(spec=None, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A Mesh over `devices` (default: all, across processes) with the config's named axes, all 'Auto'.

  Auto axes (not JAX's newer Explicit default) because sharding here is steered by logical-axis constraints and
  the compiler's propagation, which is what flax.linen's partitioning metadata is built for.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(spec, len(devices))
  names = tuple(shape)
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  return jax.make_mesh(tuple(shape.values()), names, axis_types=auto, devices=devices)


def batch_shards(mesh) -> int:
  """How many ways the batch is split: the product of the batch axes' sizes."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def check_batch(batch_size: int, mesh, process_count: int | None = None) -> None:
  """Raises MeshError unless the global batch splits evenly over the batch axes and the processes."""
  process_count = process_count or jax.process_count()
  shards = batch_shards(mesh)
  if batch_size % shards:
    axes = ' x '.join(f'{a}={mesh.shape[a]}' for a in batch_axes(mesh))
    raise MeshError(f'config.batch_size={batch_size} is not divisible by the {shards} batch shards of the mesh '
                    f'({axes}); use a multiple of {shards}')
  if batch_size % process_count:
    raise MeshError(f'config.batch_size={batch_size} is not divisible by the {process_count} processes')


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def rules(config=None, mesh=None) -> tuple:
  """The logical-axis rules (LOGICAL_RULES, or config.sharding_rules), restricted to the axes `mesh` has.

  A rule naming an axis the mesh lacks (no 'expert' axis in a dense run) keeps only the axes it has.
  """
  custom = config.get('sharding_rules') if config is not None else None
  table = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in custom) if custom else LOGICAL_RULES
  if mesh is None:
    return table
  out = []
  for logical, axes in table:
    if axes is None:
      out.append((logical, None))
      continue
    kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.axis_names)
    out.append((logical, None if not kept else kept[0] if len(kept) == 1 else kept))
  return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# Shardings of parameters and optimizer state.
# ---------------------------------------------------------------------------------------------------------
def _fit_spec(spec: P, shape: Sequence[int], mesh) -> P:
  """Drops mesh axes from dims they do not divide (those dims stay replicated)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for name in names:
      size = mesh.shape[name]
      if dim % (math.prod(mesh.shape[k] for k in kept) * size) == 0:
        kept.append(name)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def logical_shardings(abstract_tree, logical_specs, mesh, axis_rules=LOGICAL_RULES):
  """NamedShardings for a tree of arrays from its tree of logical PartitionSpecs (flax `get_partition_spec`)."""
  def one(x, spec):
    if spec is None:
      return NamedSharding(mesh, P())
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), axis_rules)
    return NamedSharding(mesh, _fit_spec(mesh_spec, np.shape(x), mesh))
  return jax.tree.map(one, abstract_tree, logical_specs,
                      is_leaf=lambda s: isinstance(s, P) or s is None)


def _dict_path(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh):
  """Optimizer-state shardings: a leaf shaped like a parameter (Adam moments, ...) takes that parameter's sharding.

  Optax states nest param-shaped trees (mu, nu) inside named tuples and masks; the dict keys along a leaf's
  path end with the parameter's own path, so match on that suffix and on shape. Anything else (step counts,
  Adafactor's factored row/column statistics) is small and stays replicated.
  """
  by_path = {}
  for (path, x), (_, s) in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                               jax.tree_util.tree_flatten_with_path(param_shardings)[0]):
    by_path[_dict_path(path)] = (tuple(np.shape(x)), s)
  longest = max((len(k) for k in by_path), default=0)

  def one(path, x):
    keys = _dict_path(path)
    for n in range(min(len(keys), longest), 0, -1):
      hit = by_path.get(keys[-n:])
      if hit is not None and hit[0] == tuple(np.shape(x)):
        return hit[1]
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


# ---------------------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------------------
def global_batch(local_batch: dict, mesh) -> dict:
  """This process's rows of the batch (numpy) -> global jax Arrays split over the batch axes.

  Each process passes its own consecutive slice of the global batch (process p holds rows p*b .. (p+1)*b);
  single-process this is just a sharded device_put.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise MeshError(f'batch field {key!r} is a scalar; every batch field needs a leading batch dimension')
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def describe(mesh) -> str:
  """'data=2 fsdp=2 tensor=2 (8 devices, 2 processes)' for logs."""
  axes = ' '.join(f'{a}={mesh.shape[a]}' for a in mesh.axis_names)
  return f'{axes} ({mesh.size} devices, {jax.process_count()} process{"es" if jax.process_count() > 1 else ""})'


def sharded_fraction(shardings) -> float:
  """Fraction of leaves in a tree of NamedShardings that are split over at least one mesh axis (for tests/logs)."""
  leaves = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  split = [s for s in leaves if any(a is not None for a in s.spec)]
  return len(split) / max(len(leaves), 1)
