"""Analytic FLOP counts (jmm.flops) against hand counts and XLA's cost analysis of the real training step."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from jmm import flops  # noqa: E402


def test_encoder_flops_by_hand():
  # One block, 10 tokens, width 8, mlp 32: projections 4*10*64, attention 2*100*8, MLP 2*10*8*32 multiply-adds.
  assert flops.encoder_flops(10, 8, 1, 32) == 2 * (4 * 10 * 64 + 2 * 100 * 8 + 2 * 10 * 8 * 32)
  assert flops.encoder_flops(10, 8, 3, 32) == 3 * flops.encoder_flops(10, 8, 1, 32)


def test_model_flops_parts_add_up():
  config = common.load_config('configs/siglip.py:img=S/16,txt=S,res=224,batch=16')
  config.data.text_len = 64
  f = flops.model_flops(config)
  assert f['forward'] == f['image_forward'] + f['text_forward'] + f['loss_forward']
  # 196 patches of 16x16x3 pixels into width 384, 16 images.
  assert f['image_parts']['embed'] == 16 * 2 * 196 * 768 * 384
  assert f['train_step'] == 3 * f['forward'] - f['image_parts']['embed']
  # A head-free image tower (out_dim=0, as HF SigLIP's) counts no head matmul.
  config.model.image['out_dim'] = 0
  assert flops.model_flops(config)['image_parts']['head'] == f['image_parts']['head'] - 16 * 2 * 384 * 768


def _small_config():
  config = common.load_config('configs/siglip.py:res=32,batch=8')
  config.model.image.update(width=64, depth=2, mlp_dim=256, num_heads=2, patch_size=(8, 8))
  config.model.text.update(width=64, depth=2, mlp_dim=256, num_heads=2)
  config.model.out_dim = 64
  config.data.text_len = 16
  return config


@pytest.mark.parametrize('hard_negatives', [False, True])
def test_analytic_matches_xla_cost_analysis_small(hard_negatives):
  config = _small_config()
  config.objectives.sigmoid.hard_negatives = hard_negatives  # The text tower on 2B texts, [B, 2B] logits.
  lowered = common.lower_train_step(config, vocab_size=128, batch_size=8)
  xla = flops.xla_flops(lowered.compile())
  analytic = flops.model_flops(config)['train_step']
  assert xla is not None
  # XLA also counts elementwise work (norms, GELU, softmax, AdamW), hence above, but within 10%.
  assert 1.0 <= xla / analytic < 1.10, (xla, analytic)


@pytest.mark.slow
def test_analytic_matches_xla_cost_analysis_b16():
  config = common.load_config('configs/siglip.py:img=B/16,txt=B,res=224,batch=8')
  config.data.text_len = 64
  lowered = common.lower_train_step(config, vocab_size=32000, batch_size=8)  # Shapes only: nothing runs.
  xla = flops.xla_flops(lowered)
  analytic = flops.model_flops(config)['train_step']
  assert 0.9 <= xla / analytic <= 1.1, (xla, analytic)


def test_remat_does_not_change_model_flops_but_xla_counts_recompute():
  config = _small_config()
  base = flops.xla_flops(common.lower_train_step(config, 128, 8))
  for tower in (config.model.image, config.model.text):
    tower['remat_policy'] = 'full'
  remat = flops.xla_flops(common.lower_train_step(config, 128, 8))
  # Model FLOPs ignore recomputation; the compiled step does one more forward of the encoders.
  assert flops.model_flops(config)['train_step'] == flops.model_flops(_small_config())['train_step']
  assert remat > 1.15 * base
