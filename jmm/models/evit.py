"""EViT token reorganisation (Liang et al., ICLR 2022, "Not All Patches are What You Need: Expediting Vision
Transformers via Token Reorganizations"): in chosen blocks of the image tower, keep the tokens the block's
attention looks at most and fuse the rest into one token, so the blocks after it run on fewer tokens.

Where, as in the paper and its code: inside a reorganisation block, after the attention residual and before the
MLP, so that block's MLP already runs on the shorter sequence. Of the block's T candidate tokens (every token but a
class token; a token fused by an earlier block is a candidate like the others, as in the official code):

  keep = ceil(keep_rate * T) tokens (`num_kept`; the product rounded to 6 decimals first, so 0.7 * 10 keeps 7),
  in descending attentiveness, ties to the lower position (jax.lax.top_k's order; the official code's
  torch.topk(sorted=True)). Order matters to nothing downstream: positions were added before the encoder, and
  every pooling is permutation-invariant over the image tokens;
  then one fused token sum_{j not kept} a_j x_j: the paper's Eq. 3, weighted by the attentiveness as it is (not
  renormalised over the fused tokens, as the official code), appended last;
  keep == T (keep_rate 1, or too few tokens for the ceil to drop one): the block is left as it is, no fused token.

A class token stays first and is never fused, so a block maps 1 + T tokens to 1 + keep + 1 ('tok' pooling) and T to
keep + 1 otherwise (`schedule` gives the counts). The counts are static: one compiled program, as the paper.
Evaluation runs the same reorganisation (the paper's inference speed-up); the parameters are those of the plain
ViT, so EViT off (`evit` None, or no layers) is the plain tower bit for bit.

Attentiveness a_j (`attentiveness`): head-averaged attention probabilities of the block's own q and k, float32,
computed under stop_gradient: the ranking has no gradient anyway, and the fusion weights are constants in the
backward pass (gradients reach the fused tokens' values, not q and k through the weights). The official code also
differentiates the weights; we do not, because those second gradients of q and k would be summed with the
attention kernel's, which XLA:CPU fuses into one oneDNN fusion of two dots, a shape `jmm.cpu_matmuls` must refuse
(the whole step then falls back to XLA's matmuls); it also saves their backward matmuls. Which tokens:
  'tok' pooling: the class token's attention to token j (the paper).
  'gap' / 'map' (no class token): the mean over every query of its attention to token j. Why this one: the mean
  over tokens of the attention output is (mean_i P_i) V, so a_j is exactly the weight of token j's value in the
  mean-pooled attention output, what the class token's row is to a class-token model. 'gap' pools by that mean;
  'map' has its probe only after the last block, and the mean query is the global summary available in every
  block. Like the class token's row it sums to one, so the fused token has the paper's scale. The cost: one more
  [T, T] logits matmul per reorganisation block (the attention kernels do not return probabilities; the class
  token's row is one query's worth).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jmm.errors import ConfigError
from jmm.models import moe as moe_lib
from jmm.models import variants

FIELDS = ('layers', 'keep_rate')
DEFAULTS = dict(layers='quarters', keep_rate=0.7)


def layer_indices(layers, depth: int) -> tuple[int, ...]:
  """The reorganisation blocks (0-based, sorted) of a `depth`-block tower from a `layers` pattern.

  'quarters': blocks depth/4, depth/2, 3 depth/4 (rounded down): the paper's 4th, 7th and 10th of DeiT's 12.
  Otherwise the patterns `moe.moe_layer_indices` reads: block indices ('1,3', a list, negative from the end),
  'every_other', 'all', 'last_n:N', '' or 'none'. ValueError for anything else.
  """
  if isinstance(layers, str) and layers.strip() == 'quarters':
    return tuple(sorted({k * depth // 4 for k in (1, 2, 3)}))
  return moe_lib.moe_layer_indices(layers, depth)


def parse(evit, depth: int) -> tuple[tuple[int, ...], float]:
  """(block indices, keep_rate) from a tower's `evit` field (None or {} = off: ((), 1.0)); ValueError names the
  bad key."""
  if not evit:
    return (), 1.0
  evit = dict(evit)
  unknown = sorted(set(evit) - set(FIELDS))
  if unknown:
    raise ValueError(f'{unknown[0]}: unknown EViT field; known: {", ".join(FIELDS)}')
  keep_rate = evit.get('keep_rate', DEFAULTS['keep_rate'])
  if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate <= 1:
    raise ValueError(f'keep_rate={keep_rate!r}: expected a number in (0, 1] (the fraction of tokens kept per '
                     'reorganisation block)')
  return layer_indices(evit.get('layers', DEFAULTS['layers']), depth), float(keep_rate)


def num_kept(candidates: int, keep_rate: float) -> int:
  """ceil(keep_rate * candidates), the product rounded to 6 decimals first (float 0.7 * 10 is 7.000000000000001)."""
  return min(candidates, max(1, math.ceil(round(keep_rate * candidates, 6))))


def block_keep(tokens: int, keep_rate: float, cls_token: bool) -> int:
  """Tokens a reorganisation block keeps from `tokens` (a class token included); 0 when it would fuse none."""
  candidates = tokens - int(cls_token)
  keep = num_kept(candidates, keep_rate)
  return keep if keep < candidates else 0


def schedule(tokens: int, depth: int, layers, keep_rate: float, cls_token: bool) -> list[tuple[int, int, int]]:
  """Per block (tokens in, tokens kept or 0 for no reorganisation, tokens out) for an encoder of `depth` blocks fed
  `tokens` tokens; `layers` is a `layer_indices` pattern or the indices. For FLOP counts and tests."""
  chosen = set(layer_indices(layers, depth))
  out = []
  for i in range(depth):
    keep = block_keep(tokens, keep_rate, cls_token) if i in chosen else 0
    after = int(cls_token) + keep + 1 if keep else tokens
    out.append((tokens, keep, after))
    tokens = after
  return out


def attentiveness(q, k, cls_token: bool):
  """q, k [B, T, H, D] (a block's self-attention) -> a [B, T] float32: token j's attentiveness (module docstring):
  the class token's attention to j (cls_token), else the mean over queries; averaged over heads; no gradient."""
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  if cls_token:
    logits = jnp.einsum('bhd,bkhd->bhk', q[:, 0], k, preferred_element_type=jnp.float32)  # [B, H, T], unscaled.
  else:
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)  # [B, H, T, T], unscaled.
  # softmax(logits / sqrt(D)), scaled after the row max as `kernels.attention` does, so that no element-wise op
  # fuses into the dot (a batched dot with a scale fused after it is a oneDNN fusion `jmm.cpu_matmuls` refuses).
  probs = jnp.exp((logits - jnp.max(logits, axis=-1, keepdims=True)) * np.float32(1.0 / np.sqrt(q.shape[-1])))
  probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
  return jnp.mean(probs, axis=tuple(range(1, probs.ndim - 1)))  # Over heads (and queries).


def reorganize(x, a, keep: int, cls_token: bool):
  """x [B, T, W] and its attentiveness a [B, T] -> [B, cls + keep + 1, W]: the class token (cls_token), the `keep`
  most attentive other tokens in descending attentiveness, then their complement fused, sum_j a_j x_j."""
  head = []
  if cls_token:
    head, x, a = [x[:, :1]], x[:, 1:], a[:, 1:]
  _, order = jax.lax.top_k(a, a.shape[1])  # [B, T] every candidate, most attentive first.
  kept = jnp.take_along_axis(x, order[:, :keep, None], axis=1, mode='promise_in_bounds')  # [B, keep, W]
  rest = order[:, keep:]
  weights = jnp.take_along_axis(a, rest, axis=1, mode='promise_in_bounds')  # [B, T - keep]
  others = jnp.take_along_axis(x, rest[:, :, None], axis=1, mode='promise_in_bounds').astype(jnp.float32)
  fused = jnp.einsum('bn,bnw->bw', weights, others)[:, None].astype(x.dtype)  # [B, 1, W]
  return jnp.concatenate(head + [kept, fused], axis=1)


def validate(config) -> None:
  """ConfigError naming the field for a bad `config.model.image.evit`, and for what EViT cannot run with: a
  scanned image encoder (its blocks must be identical), a text-tower evit, and what reads the image tokens as
  patch positions: pooled-patch region evaluation (the patch grid) and MAE's decoder (the visible positions)."""
  if (config.model.get('text') or {}).get('evit'):
    raise ConfigError('config.model.text.evit: EViT reorganises image tokens; the text tower has no such field')
  image = config.model.image
  evit = image.get('evit')
  if not evit:
    return
  depth = image.get('depth') or (variants.decode_variant(image.variant)['depth'] if image.get('variant') else 0)
  try:
    layers, _ = parse(evit, depth)
  except ValueError as err:
    raise ConfigError(f'config.model.image.evit.{err}') from None
  if layers and image.get('scan'):
    raise ConfigError('config.model.image.scan=True cannot run EViT (config.model.image.evit): the token count '
                      'changes between blocks, so they cannot be one scanned block; set scan=False')
  heads = {name: str(h.get('type', '')) for name, h in (config.model.get('heads') or {}).items()}
  for name, kind in heads.items():
    if layers and kind.endswith('mae_decoder'):
      raise ConfigError(f'config.model.heads.{name}: MAE\'s decoder puts each encoded token back at its patch '
                        'position, which EViT (config.model.image.evit) reorganises away; turn one of them off')
  for name, ev in (config.get('evals') or {}).items():
    # Unset: the first CLOC head's Prompter, else 'pooled' (evaluators.region_embeddings.region_method).
    method = ev.get('method') or ('' if any(k.endswith('cloc_head') for k in heads.values()) else 'pooled')
    if layers and ev.get('type') == 'region' and method == 'pooled':
      raise ConfigError(f"config.evals.{name}: region method 'pooled' averages patch tokens inside boxes on the "
                        'patch grid, which EViT (config.model.image.evit) reorganises; use a CLOC head or turn '
                        'EViT off')
