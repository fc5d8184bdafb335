"""The image-text dual encoder of CLIP / SigLIP: two towers, L2-normalised outputs, learned scale and bias."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmm import config as config_lib
from jmm.errors import ConfigError
from jmm.models import build as build_lib
from jmm.models import evit as evit_lib
from jmm.models import layers
from jmm.models import moe as moe_lib
from jmm.models import text as text_lib
from jmm.models import vit

# Dataclass fields every flax module has; not settable from a tower dict.
_MODULE_FIELDS = ('parent', 'name')
# Config tower names -> the towers' parameter scopes (config.model.locked, config.init_from_towers).
TOWERS = {'image': 'img', 'text': 'txt'}


def tower_kwargs(config: Mapping[str, Any], module_cls, **defaults) -> dict:
  """A tower's constructor kwargs: `defaults`, then the sizes of config['variant'], then the explicit keys.

  Lets a config say {'variant': 'B/16', 'pool_type': 'gap'}; explicit keys win over the variant's values. The
  text tower ignores a variant's patch size. Unknown keys raise a ValueError naming them (not a bare TypeError).
  """
  config = dict(config)
  variant = config.pop('variant', None)
  sizes = vit.decode_variant(variant) if variant else {}
  fields = {f.name for f in dataclasses.fields(module_cls)} - set(_MODULE_FIELDS)
  if 'patch_size' not in fields:
    sizes.pop('patch_size', None)
  unknown = sorted(set(config) - fields)
  if unknown:
    raise ValueError(f'{module_cls.__name__} has no field(s) {unknown}; known: {sorted(fields)}')
  kwargs = {**{k: v for k, v in defaults.items() if k in fields}, **sizes, **config}
  if kwargs.get('patch_size') is not None:
    kwargs['patch_size'] = tuple(kwargs['patch_size'])
  return kwargs


def l2_normalize(x, eps: float = 1e-12):
  """x / ||x|| over the last axis, in float32 (bf16 sums of squares lose the precision the loss needs)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class TwoTower(nn.Module):
  """ViT image tower + text transformer tower (Radford et al. 2021; Zhai et al. 2023).

  image / text: kwargs of `vit.ViT` / `text.TextTransformer`, optionally with a 'variant' ('B/16', 'S', ...).
  Each tower's head projects to `out_dim` unless its dict sets its own out_dim. dtype / param_dtype apply to
  both towers unless a tower dict overrides them.
  Params 't' (log-temperature, init `temperature_init` = log 10 as in SigLIP; CLIP uses log(1/0.07)) and 'b'
  (bias, init -10) are float32 scalars.
  heads: optional heads by name, {name: {'type': module, **fields}} (see `jmm.models.build`); each runs
  after the towers and adds its outputs under its own name.
  locked: towers ('image', 'text') whose parameters pass through stop_gradient where the tower reads them (LiT,
  Zhai et al. 2022): no backward pass runs through a locked tower, not even for values it sows (MoE statistics).
  towers: the towers built (config.model.towers); one alone, e.g. ('image',) for MAE (jmm/models/mae_decoder.py),
  ignores the batch's other modality and has no 't' / 'b', which only score one tower against the other.

  __call__(batch, train=False) -> outputs. `batch` is a dict holding 'image' [B, H, W, 3] and / or 'text'
  int32 [B, L] (evaluators embed one modality at a time: only that tower runs) and whatever objectives add.
  outputs: 'zimg' / 'ztxt' [B, out_dim] float32 L2-normalised (for the modalities given), 'ztxt_neg' [B, out_dim]
  when the batch holds 'text_neg' (hard-negative captions, run through the text tower with 'text'), 'ztxt_regions'
  [B, R, out_dim] when a head asks for 'text_regions' (its Head.TEXT_FIELDS) and the batch holds them, 'img' / 'txt' (each
  tower's 'encoded' [B, tokens, width] and 'pre_logits' [B, width]), 't' = exp(t) and 'b', and one entry per head.
  """
  image: Mapping[str, Any]
  text: Mapping[str, Any]
  out_dim: int
  temperature_init: float = math.log(10.0)
  bias_init: float = -10.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  heads: Mapping[str, Mapping[str, Any]] | None = None
  locked: tuple[str, ...] = ()
  towers: tuple[str, ...] = tuple(TOWERS)

  def _tower_cls(self, module_cls, tower: str):
    """`module_cls`, or for a locked tower the same module reading its params through stop_gradient."""
    if tower not in self.locked:
      return module_cls
    # On the params, not the tower's outputs: every path out of the tower (outputs, sown values) is then cut, and
    # JAX's autodiff never forms tangents for the tower, so XLA has no backward pass through it to compile.
    return nn.map_variables(module_cls, 'params', trans_in_fn=lambda v: jax.tree.map(jax.lax.stop_gradient, v),
                            init=self.is_initializing())

  def _head_text_fields(self) -> tuple[str, ...]:
    """Batch text fields the heads embed through the text tower (a Head's TEXT_FIELDS, e.g. 'text_regions')."""
    fields = []
    for head in (self.heads or {}).values():
      for f in getattr(config_lib.lookup('models', head['type']).Head, 'TEXT_FIELDS', ()):
        if f not in fields:
          fields.append(f)
    return tuple(fields)

  @nn.compact
  def __call__(self, batch: Mapping[str, Any], train: bool = False) -> dict[str, Any]:
    defaults = dict(out_dim=self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype)
    outputs = {}
    has = {t: batch.get(t) is not None and t in self.towers for t in TOWERS}
    if not any(has.values()) and any(batch.get(t) is not None for t in TOWERS):  # e.g. texts, image-only model.
      raise ValueError(f'TwoTower builds the towers {self.towers} (config.model.towers); the batch has none of '
                       'their inputs')
    if has['image']:
      img_tower = self._tower_cls(vit.ViT, 'image')(**tower_kwargs(self.image, vit.ViT, **defaults), name='img')
      # 'image_keep': the patch positions to encode (FLIP's masked training; absent = all, as in evaluation).
      emb, outputs['img'] = img_tower(batch['image'], train=train, keep=batch.get('image_keep'))
      outputs['zimg'] = l2_normalize(emb)  # [B, out_dim]
    if has['text']:
      txt_tower = self._tower_cls(text_lib.TextTransformer, 'text')(
          **tower_kwargs(self.text, text_lib.TextTransformer, **defaults), name='txt')
      text = batch['text']
      n, length = text.shape
      # Extra texts embedded by the same tower call, split after: hard-negative captions 'text_neg' [B, L], and
      # the texts a head asks for by its TEXT_FIELDS (CLOC's per-box phrases 'text_regions' [B, R, L]).
      extra = [(f, batch[f]) for f in ('text_neg', *self._head_text_fields()) if batch.get(f) is not None]
      if extra:
        text = jnp.concatenate([text] + [t.reshape(-1, length) for _, t in extra], axis=0)
      emb, outputs['txt'] = txt_tower(text, train=train)
      ztxt = l2_normalize(emb)  # [B (+ extra rows), out_dim]
      if extra:
        start = n
        for field, t in extra:
          rows = math.prod(t.shape[:-1])
          outputs['ztxt' + field[len('text'):]] = ztxt[start:start + rows].reshape(*t.shape[:-1], -1)
          start += rows
        ztxt = ztxt[:n]
        outputs['txt'] = jax.tree.map(lambda x: x[:n], outputs['txt'])
      outputs['ztxt'] = ztxt  # [B, out_dim]
    if len(self.towers) == len(TOWERS):
      # Scalars stay float32 whatever param_dtype is: the logits scale is too sensitive for bf16.
      t = self.param('t', layers.partitioned(nn.initializers.constant(self.temperature_init), ()), (), jnp.float32)
      b = self.param('b', layers.partitioned(nn.initializers.constant(self.bias_init), ()), (), jnp.float32)
      outputs['t'] = jnp.exp(t)
      outputs['b'] = b
    for name, head in (self.heads or {}).items():
      fields = {k: v for k, v in dict(head).items() if k != 'type'}
      outputs[name] = config_lib.lookup('models', head['type']).Head(**fields, name=f'head_{name}')(
          outputs, batch, train=train)
    return outputs


def build(config, vocab_size: int) -> TwoTower:
  """The two-tower model described by `config.model` (the contract of `jmm.models.build.make_model`)."""
  m = config.model
  impl = config.get('attention_impl', 'xla')
  image = {**_as_dict(m.image), 'attention_impl': impl}
  text = {**_as_dict(m.text), 'vocab_size': vocab_size, 'attention_impl': impl}
  for tower, name in ((image, 'image'), (text, 'text')):
    moe = moe_lib.tower_moe(config, name)
    if moe:  # Mixture-of-experts MLPs in some blocks (config.model.moe).
      tower['moe'] = moe
    if tower.get('patch_size') is not None:
      tower['patch_size'] = tuple(tower['patch_size'])
    for k in [k for k, v in tower.items() if v is None or v == '']:
      del tower[k]
  heads = {name: _as_dict(head) for name, head in _as_dict(m.get('heads') or {}).items()}
  return TwoTower(image=image, text=text, out_dim=m.out_dim, temperature_init=m.temperature_init,
                  bias_init=m.bias_init, dtype=build_lib.DTYPES[config.get('dtype', 'float32')], heads=heads or None,
                  locked=locked_towers(config), towers=built_towers(config))


def tower_names(value, field: str) -> tuple[str, ...]:
  """'image,text' (or a list / tuple) -> ('image', 'text'); ConfigError naming `field` for an unknown tower."""
  if isinstance(value, str):
    value = [t.strip() for t in value.split(',') if t.strip()]
  names = tuple(value or ())
  bad = [t for t in names if t not in TOWERS]
  if bad:
    raise ConfigError(f'{field}={bad[0]!r} is not a tower; expected a comma-separated subset of {list(TOWERS)}')
  return names


def built_towers(config) -> tuple[str, ...]:
  """The towers `config.model.towers` builds ('' = both)."""
  return tower_names(config.model.get('towers', ''), 'config.model.towers') or tuple(TOWERS)


def locked_towers(config) -> tuple[str, ...]:
  """The towers `config.model.locked` locks ('' = none)."""
  return tower_names(config.model.get('locked', ''), 'config.model.locked')


def locked_params(config) -> tuple[str, ...]:
  """The top-level parameter names of the locked towers ('img', 'txt'): the optimizer keeps no state for them."""
  return tuple(TOWERS[t] for t in locked_towers(config))


def init_from_params(config) -> tuple[str, ...] | None:
  """The top-level parameter names `config.init_from` loads: those of `config.init_from_towers`, None = all."""
  towers = tower_names(config.get('init_from_towers', ''), 'config.init_from_towers')
  return tuple(TOWERS[t] for t in towers) or None


def validate(config) -> None:
  """Checks config.model for this model: tower variants, the patch size against the resolution, MoE fields."""
  for tower in ('image', 'text'):
    variant = config.model[tower].get('variant')
    if variant:
      try:
        vit.decode_variant(variant)
      except ValueError as e:
        raise ConfigError(f'config.model.{tower}.variant: {e}') from None
  patch = config.model.image.get('patch_size')
  if patch is None and config.model.image.get('variant'):
    patch = vit.decode_variant(config.model.image.variant).get('patch_size')
  resolution = config.data.resolution
  if patch is not None and resolution % patch[0]:
    raise ConfigError(f'config.data.resolution={resolution} is not divisible by the patch size {tuple(patch)}')
  for name, head in (config.model.get('heads') or {}).items():
    if 'type' not in head:
      raise ConfigError(f'config.model.heads.{name} needs a type (a module with a Head class)')
    if not hasattr(config_lib.lookup('models', head['type']), 'Head'):
      raise ConfigError(f'config.model.heads.{name}.type={head["type"]!r} has no Head class')
  moe_lib.validate(config)  # config.model.moe: mixture-of-experts fields (absent or num_experts=0: dense).
  evit_lib.validate(config)  # config.model.image.evit: EViT token reorganisation (absent: off).
  locked, loaded, built = locked_towers(config), init_from_params(config), built_towers(config)
  for field, value, towers in (('model.locked', config.model.get('locked'), locked),
                               ('init_from_towers', config.get('init_from_towers'),
                                [t for t in TOWERS if TOWERS[t] in (loaded or ())])):
    if set(towers) - set(built):
      raise ConfigError(f'config.{field}={value!r} names a tower that config.model.towers='
                        f'{config.model.towers!r} does not build')
  if len(locked) == len(TOWERS) and not config.model.get('heads'):
    raise ConfigError(f'config.model.locked={config.model.locked!r} locks both towers: nothing but the temperature '
                      'and bias would train')
  # A locked tower keeps the values it starts from: random ones are only wanted by tests and benchmarks.
  if locked and not config.model.get('locked_random_ok', False):
    unloaded = [t for t in locked if not config.get('init_from') or (loaded and TOWERS[t] not in loaded)]
    if unloaded:
      where = ('config.init_from is empty' if not config.get('init_from') else
               f'config.init_from_towers={config.init_from_towers!r} does not load it')
      raise ConfigError(f'config.model.locked={config.model.locked!r}: the {unloaded[0]} tower would stay at its '
                        f'random initialisation ({where}); give the weights to start from with config.init_from, '
                        'or set config.model.locked_random_ok=True (tests, benchmarks)')
  if loaded and not config.get('init_from'):
    raise ConfigError(f'config.init_from_towers={config.init_from_towers!r} needs config.init_from')


def _as_dict(node) -> dict:
  return node.to_dict() if hasattr(node, 'to_dict') else dict(node)
