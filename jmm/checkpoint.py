"""Checkpoints: Orbax CheckpointManager holding train state (params, optimizer, step) and data-iterator state.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when complete), so a
crash mid-save leaves the previous checkpoint as the latest one, never a half-written one.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from jmm.errors import CheckpointMismatchError  # noqa: F401  (re-exported)
from jmm.optim import param_path

# Train-state entries added after checkpoints were first written: a checkpoint without them still resumes.
OPTIONAL = ('rng', 'nonfinite')


class Checkpointer:
  """Keeps the last `keep` checkpoints under `workdir/checkpoints`, one every `every` steps."""

  def __init__(self, workdir: str, *, keep: int = 3, every: int = 1000, use_async: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=use_async, create=True)
    # Handlers named up front, so metadata of an existing checkpoint can be read before the first restore.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, *, force: bool = False) -> bool:
    """Starts a save of `state` and the data iterator's state at `step` (if due, or if `force`)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    return self.manager.save(step, args=args, force=force)

  def _saved_tree(self, step: int):
    meta = self.manager.item_metadata(step)['state']
    meta = getattr(meta, 'tree', meta)
    if meta is None:
      raise CheckpointMismatchError(f'checkpoint {self.directory}/{step} has no readable state metadata')
    return meta

  def check_shapes(self, step: int, abstract_state) -> None:
    """Raises CheckpointMismatchError naming the first parameter whose saved shape differs from the model's."""
    meta = self._saved_tree(step)
    want = {param_path(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    have = {param_path(p): tuple(getattr(x, 'shape', ()) or ())
            for p, x in jax.tree_util.tree_flatten_with_path(meta)[0]}
    where = os.path.join(self.directory, str(step))
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
      raise CheckpointMismatchError(
          f'checkpoint {where} was written by a different model: parameters missing from it: {missing[:5]}, '
          f'unexpected in it: {extra[:5]}. Use a fresh --workdir or the config that wrote it.')
    # Parameters first: a user recognises 'params/img/...' more readily than its optimizer moments.
    for key in sorted(want, key=lambda k: (not k.startswith('params/'), k)):
      shape = want[key]
      if have[key] != shape:
        raise CheckpointMismatchError(
            f'checkpoint {where} was written by a different model shape: {key} has shape {have[key]} there, '
            f'but the config builds {shape}. Use a fresh --workdir or the config that wrote it.')

  def restore(self, step: int, abstract_state):
    """Restores (state, data_state) at `step` into the structure and shardings of `abstract_state`.

    Top-level entries of OPTIONAL that the checkpoint predates (written before the train state carried them)
    are left out of the returned state: the caller keeps its fresh values for them.
    """
    saved = self._saved_tree(step)
    abstract_state = {k: v for k, v in abstract_state.items() if k not in OPTIONAL or k in saved}
    self.check_shapes(step, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], (restored['data'] or None)

  def wait(self) -> None:
    """Blocks until any asynchronous save has been committed to disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a tree of arrays: a restore target that allocates nothing."""
  def one(x):
    sharding = getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree.map(one, tree)
