"""Analytic FLOP counts of the two-tower model and the contrastive loss, for MFU and the benchmark harness.

Counts are matmul FLOPs (2 per multiply-add), the convention of MFU as defined in the PaLM paper (Chowdhery et
al. 2022, appendix B): elementwise work (norms, GELU, softmax, the optimizer) is left out, and activation
recomputation (remat) is not counted, so MFU does not reward recomputing. A training step costs the forward
plus a backward of twice the forward (one matmul for the input gradient, one for the weight gradient), except
the patch embedding, whose input (the image) needs no gradient: it costs forward + weight gradient only, and a
locked tower (`config.model.locked`), which costs its forward only.

`jax.jit(f).lower(...).compile().cost_analysis()['flops']` counts the same matmuls plus the elementwise work;
tests/test_flops.py and benchmarks/train_step.py check the two agree within 10%.
"""
from __future__ import annotations

from typing import Any, Mapping

from jmm.models import evit as evit_lib
from jmm.models import text as text_lib
from jmm.models import two_tower
from jmm.models import vit


def encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> int:
  """Forward FLOPs of `depth` pre-LN blocks on one sequence of `tokens` tokens.

  Per block: q, k, v and output projections (4 * T * D^2 multiply-adds), the two attention matmuls q k^T and
  p v (2 * T^2 * D), and the MLP (2 * T * D * mlp_dim).
  """
  per_block = 4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp_dim
  return 2 * depth * per_block


def evit_encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int, evit,
                       cls_token: bool) -> tuple[int, int, int]:
  """(forward FLOPs of the blocks, of the attentiveness, tokens after the last block) of an encoder with EViT
  reorganisation blocks (`jmm.models.evit`; `evit` a tower's field, None: none).

  Each block as in `encoder_flops` on the tokens it receives, except that a reorganisation block's MLP runs on the
  tokens it keeps and it adds the fused token's weighted sum (one multiply-add per fused token and channel). The
  attentiveness logits (a class token's row, T * D multiply-adds, or every query's, T^2 * D) are apart: they run
  under stop_gradient, forward only.
  """
  layers, keep_rate = evit_lib.parse(evit, depth)
  macs = attentiveness = 0
  for t_in, keep, t_out in evit_lib.schedule(tokens, depth, layers, keep_rate, cls_token):
    macs += 4 * t_in * width * width + 2 * t_in * t_in * width + 2 * t_out * width * mlp_dim
    if keep:
      macs += (t_in - int(cls_token) - keep) * width
      attentiveness += (t_in if cls_token else t_in * t_in) * width
    tokens = t_out
  return 2 * macs, 2 * attentiveness, tokens


def map_head_flops(tokens: int, width: int, mlp_dim: int) -> int:
  """Forward FLOPs of the MAP head (one probe query attending to `tokens` tokens, then an MLP) per example."""
  macs = (width * width            # probe -> query
          + 2 * tokens * width * width  # keys and values of every token
          + 2 * tokens * width     # q k^T and p v for one query
          + width * width          # output projection
          + 2 * width * mlp_dim)   # MLP on the pooled token
  return 2 * macs


def tower_flops(sizes: Mapping[str, Any], tokens: int, patch_pixels: int = 0) -> dict:
  """Forward FLOPs per example of one tower, split into 'embed' (patch embedding), 'encoder' and 'head'.

  `sizes` holds width, depth, mlp_dim, pool_type and out_dim (None: no linear head), and for an image tower
  optionally evit (EViT: fewer tokens after its reorganisation blocks, and a part 'evit', its attentiveness;
  `evit_encoder_flops`); `tokens` is the
  sequence length the encoder sees; `patch_pixels` = patch_h * patch_w * channels for an image tower, 0 for
  text (a token embedding is a gather, not a matmul).
  """
  width, mlp_dim = sizes['width'], sizes['mlp_dim']
  embed = 2 * tokens * patch_pixels * width
  evit = {}
  if sizes.get('evit'):
    encoder, evit['evit'], tokens = evit_encoder_flops(tokens, width, sizes['depth'], mlp_dim, sizes['evit'],
                                                       sizes.get('pool_type') == 'tok')
  else:
    encoder = encoder_flops(tokens, width, sizes['depth'], mlp_dim)
  head = map_head_flops(tokens, width, mlp_dim) if sizes.get('pool_type') == 'map' else 0
  if sizes.get('out_dim'):  # None or 0: no head.
    head += 2 * width * sizes['out_dim']
  return {'embed': embed, 'encoder': encoder, 'head': head, **evit}


def _sizes(tower: Mapping[str, Any], module_cls, out_dim: int) -> dict:
  """A tower config (variant or explicit sizes) resolved to its constructor kwargs, as the model builds it."""
  tower = {k: v for k, v in dict(tower).items() if v is not None and v != ''}
  return two_tower.tower_kwargs(tower, module_cls, out_dim=out_dim)


def model_flops(config, batch_size: int | None = None) -> dict:
  """Analytic FLOPs of one training step of `config` (a jmm training config), by part.

  Returns a dict: 'image_forward', 'text_forward', 'loss_forward' (per batch), 'forward' (their sum),
  'train_step' (forward + backward, see the module docstring) and 'per_example_forward'. The loss counts the
  [batch, batch] logits matmul of the sigmoid / softmax loss; a contrastive objective with hard_negatives runs
  the text tower on twice the texts and scores [batch, 2 batch] logits.
  """
  batch = batch_size or config.batch_size
  m = config.model
  res, text_len = config.data.resolution, config.data.text_len
  img = _sizes(m.image.to_dict() if hasattr(m.image, 'to_dict') else m.image, vit.ViT, m.out_dim)
  txt = _sizes(m.text.to_dict() if hasattr(m.text, 'to_dict') else m.text, text_lib.TextTransformer,
               m.out_dim)
  ph, pw = img.get('patch_size', (16, 16))
  img_tokens = (res // ph) * (res // pw) + (1 if img.get('pool_type', 'map') == 'tok' else 0)
  img_parts = tower_flops({**img, 'pool_type': img.get('pool_type', 'map')}, img_tokens, ph * pw * 3)
  txt_parts = tower_flops({**txt, 'pool_type': txt.get('pool_type', 'last')}, text_len)
  out_img = img.get('out_dim') or img['width']
  objectives = config.get('objectives') or {}
  texts = 2 if any(o.get('hard_negatives', False) for o in objectives.values() if hasattr(o, 'get')) else 1
  loss = 2 * batch * texts * batch * out_img
  image_fwd, text_fwd = batch * sum(img_parts.values()), texts * batch * sum(txt_parts.values())
  forward = image_fwd + text_fwd + loss
  # Backward = 2x forward, less the patch embedding's input gradient (images are not differentiated) and EViT's
  # attentiveness (under stop_gradient: no backward). A locked tower (config.model.locked) runs forward only: no
  # input or weight gradients.
  locked = two_tower.locked_towers(config)
  image_bwd = 2 * image_fwd - batch * (img_parts['embed'] + 2 * img_parts.get('evit', 0))
  train_step = forward + image_bwd + 2 * (text_fwd + loss)
  if 'image' in locked:
    train_step -= image_bwd
  if 'text' in locked:
    train_step -= 2 * text_fwd
  train_step -= len(locked) * loss  # The logits' gradient for a locked side's embeddings is not formed either.
  return {'image_forward': image_fwd, 'text_forward': text_fwd, 'loss_forward': loss, 'forward': forward,
          'train_step': train_step, 'per_example_forward': forward / batch,
          'image_parts': {k: batch * v for k, v in img_parts.items()},
          'text_parts': {k: batch * v for k, v in txt_parts.items()}}


def xla_flops(compiled) -> float | None:
  """The 'flops' of a compiled (or lowered) jax computation's cost analysis, or None where the backend has none.

  `cost_analysis()` returns a dict (new jax) or a list with one dict per device program (older jax).
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Some backends raise instead of returning None.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])
