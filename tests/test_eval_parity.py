"""End-to-end fidelity of evaluating released weights: a randomly initialised HF SiglipModel and CLIPModel, saved
with `save_pretrained` beside their tokenizer and image-processor files, converted by `jmm.convert.import_weights`
and evaluated zero-shot by `jmm.evaluate` on real photographs, give the same per-image scores (to 1e-4) and
predictions as transformers running the same model on the same files with its own preprocessing and tokenizer."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import photos
import tiny_vocab

torch = pytest.importorskip('torch')
if 'torchvision' not in sys.modules:  # Broken beside the CPU torch wheel (see tests/test_convert.py).
  try:
    import torchvision  # noqa: F401  pylint: disable=unused-import
  except Exception:  # pylint: disable=broad-except
    for _name in [n for n in sys.modules if n.startswith('torchvision')]:
      del sys.modules[_name]
    sys.modules['torchvision'] = None
transformers = pytest.importorskip('transformers')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES, PATCH, TEXT_LEN = 32, 8, 16
# Capitals and punctuation exercise SigLIP's text canonicalisation; two templates, the prompt ensemble.
TEMPLATES = ('a photo of a {}.', 'A blurry PHOTO of the {}!')


def _tower(width, depth, heads, mlp):
  return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp)


def _prompts():
  return [t.format(c) for c in photos.CLASSES for t in TEMPLATES]  # Class-major, as [C, T].


def _hf_scores(model, tokenizer, processor):
  """Per-image cosine similarities with each class's prompt-ensemble embedding, all by transformers."""
  ordered = sorted(photos.PHOTOS, key=lambda p: (p.cls, p.file))  # The folder source's order.
  images = [Image.open(os.path.join(photos.data_dir(), p.file)) for p in ordered]
  pixels = processor(images=images, return_tensors='np')['pixel_values']
  ids = tokenizer(_prompts(), padding='max_length', max_length=TEXT_LEN, truncation=True,
                  return_tensors='np')['input_ids']
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=torch.from_numpy(pixels))
  zimg, ztxt = out.image_embeds.numpy(), out.text_embeds.numpy()
  cls = ztxt.reshape(len(photos.CLASSES), len(TEMPLATES), -1).mean(1)
  cls /= np.linalg.norm(cls, axis=-1, keepdims=True)
  return zimg @ cls.T, np.array([photos.label(p) for p in ordered])


def _write_lists(tmp_path):
  (tmp_path / 'classes.txt').write_text('\n'.join(photos.CLASSES) + '\n')
  (tmp_path / 'templates.txt').write_text('\n'.join(TEMPLATES) + '\n')
  return photos.write_folder(tmp_path / 'photos'), str(tmp_path / 'classes.txt'), str(tmp_path / 'templates.txt')


def _convert(src, out):
  from jmm.convert import import_weights
  assert import_weights.main(['--format=hf', f'--src={src}', f'--out={out}']) == 0
  return out


def _check(jmm_scores, jmm_labels, hf):
  scores, labels = hf
  np.testing.assert_array_equal(jmm_labels, labels)
  np.testing.assert_allclose(jmm_scores, scores, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(jmm_scores.argmax(-1), scores.argmax(-1))
  assert np.ptp(scores, axis=1).min() > 1e-3  # Classes told apart: a degenerate text side would agree trivially.


def test_siglip_released_style_weights_evaluate_like_transformers(tmp_path):
  from jmm.data import tokenizer as tokenizer_lib
  hf_dir = tmp_path / 'hf_siglip'
  hf_dir.mkdir()
  # SigLIP's tokenizer is SentencePiece (pad 0, eos 1, unk 2): one learnt here on the captions and prompts.
  sentences = [c for p in photos.PHOTOS for c in p.captions] + [tokenizer_lib.canonicalize(t) for t in _prompts()]
  vocab = tokenizer_lib.train_tokenizer(sentences, str(hf_dir / 'spiece.model'), 160).vocab_size
  torch.manual_seed(0)
  config = transformers.SiglipConfig(
      text_config=dict(_tower(32, 2, 2, 64), vocab_size=vocab, max_position_embeddings=TEXT_LEN),
      vision_config=dict(_tower(32, 2, 2, 64), image_size=RES, patch_size=PATCH))
  model = transformers.SiglipModel(config).eval()
  model.save_pretrained(str(hf_dir))
  tokenizer = transformers.SiglipTokenizer(vocab_file=str(hf_dir / 'spiece.model'), model_max_length=TEXT_LEN)
  processor = transformers.SiglipImageProcessorPil(size={'height': RES, 'width': RES})
  processor.save_pretrained(str(hf_dir))
  weights = _convert(str(hf_dir), str(tmp_path / 'siglip.npz'))
  folder, classes, templates = _write_lists(tmp_path)

  # The command a user runs, on 4 host devices (the embeddings are computed data-parallel over them).
  out = tmp_path / 'imagenet.json'
  arg = (f'weights={weights},tokenizer={hf_dir / "spiece.model"},data={folder},classes={classes},'
         f'templates={templates},batch=4,scores={tmp_path / "scores.npz"}')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'jmm.evaluate', f'--config=configs/eval/imagenet.py:{arg}',
                         f'--out={out}'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'imagenet  top1' in proc.stdout and 'data=4' in proc.stdout, proc.stdout
  results = json.loads(out.read_text())
  with np.load(tmp_path / 'scores.npz') as z:
    jmm_scores, jmm_labels = z['scores'], z['labels']
  hf = _hf_scores(model, tokenizer, processor)
  _check(jmm_scores, jmm_labels, hf)
  assert results['imagenet/top1'] == pytest.approx(np.mean(hf[0].argmax(-1) == hf[1]))


def test_clip_released_style_weights_evaluate_like_transformers(tmp_path):
  from jmm import evaluate
  hf_dir = tmp_path / 'hf_clip'
  hf_dir.mkdir()
  corpus = [c for p in photos.PHOTOS for c in p.captions] + _prompts()
  _, tokens = tiny_vocab.write_clip_bpe(hf_dir, corpus, 60)
  torch.manual_seed(1)
  config = transformers.CLIPConfig(
      text_config=dict(_tower(32, 2, 2, 64), vocab_size=len(tokens), max_position_embeddings=TEXT_LEN,
                       eos_token_id=len(tokens) - 1),
      vision_config=dict(_tower(32, 2, 2, 64), image_size=RES, patch_size=PATCH), projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(str(hf_dir))
  vocab = json.loads((hf_dir / 'vocab.json').read_text())
  merges = [tuple(line.split()) for line in (hf_dir / 'merges.txt').read_text().split('\n')[1:] if line]
  tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  processor = transformers.CLIPImageProcessorPil(size={'shortest_edge': RES}, crop_size={'height': RES, 'width': RES})
  processor.save_pretrained(str(hf_dir))
  weights = _convert(str(hf_dir), str(tmp_path / 'clip.npz'))
  folder, classes, templates = _write_lists(tmp_path)

  spec = importlib.util.spec_from_file_location('eval_imagenet', os.path.join(ROOT, 'configs/eval/imagenet.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(f'weights={weights},tokenizer={hf_dir},data={folder},classes={classes},'
                          f'templates={templates},batch=4,scores={tmp_path / "scores.npz"}')
  assert cfg.evals.imagenet.data.transform == 'resize_crop'  # CLIP's preprocessing, from the converted file.
  results = evaluate.evaluate_checkpoint(cfg)  # In this process: 8 host devices (tests/conftest.py).
  with np.load(tmp_path / 'scores.npz') as z:
    jmm_scores, jmm_labels = z['scores'], z['labels']
  hf = _hf_scores(model, tokenizer, processor)
  _check(jmm_scores, jmm_labels, hf)
  assert results['imagenet/top1'] == pytest.approx(np.mean(hf[0].argmax(-1) == hf[1]))
