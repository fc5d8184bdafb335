"""Config parts shared by the recipe files in configs/: data, tokenizer, towers, optimizer, checkpoints, evaluators.

Part of the package (not of configs/) so that a config file anywhere imports it as `from jmm import recipes`.
"""
import math

import ml_collections

from jmm.models import moe

# The default tiny towers: sized so the default run finishes on a 2-core CPU in under 10 minutes. Shape, not
# colour, is what limits zero-shot accuracy on the synthetic data, so the image tower gets the compute (48 px,
# 8 px patches: a small shape spans about 2x2 patches). Two text blocks: a one-block run scored 69.7% zero-shot
# against 79.3% (single runs each).
# Mean-pooled ('gap'): with SigLIP's MAP head the held-out zero-shot of seeds 2:2 / 1:3 was 64.4 / 72.7%, with
# 'gap' 76.7 / 73.6% (benchmarks/NOTES.md 2026-12-03); big variants keep 'map'.
TINY_IMAGE = dict(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=(8, 8), pool_type='gap')
TINY_TEXT = dict(width=128, depth=2, mlp_dim=512, num_heads=4, pool_type='last')


def tower(name: str, tiny: dict, **extra) -> dict:
  """'tiny' -> the explicit tiny sizes; anything else is a variant name such as 'B/16' or 'So400m'."""
  if name == 'tiny':
    return {**tiny, **extra}
  return {'variant': name, **extra}


def contrastive(loss: str = 'sigmoid', impl: str = 'dense', weight: float = 1.0, hard_negatives: bool = False) -> dict:
  """A `config.objectives` entry for the contrastive objective (jmm/objectives/contrastive.py)."""
  return dict(type='contrastive', weight=weight, loss=loss, impl=impl, hard_negatives=hard_negatives)


def flip(config, mask_ratio: float = 0.5, unmasked_steps: int = 0, loss: str = 'sigmoid', impl: str = 'dense',
         weight: float = 1.0, hard_negatives: bool = False) -> dict:
  """A `config.objectives` entry for FLIP (jmm/objectives/flip.py): the contrastive loss on a random
  `1 - mask_ratio` of each image's patches, on the patch grid of `config.model.image`."""
  from jmm.objectives import flip as flip_lib  # pylint: disable=g-import-not-at-top
  return dict(contrastive(loss, impl, weight, hard_negatives), type='flip', mask_ratio=mask_ratio,
              unmasked_steps=unmasked_steps, patch_size=flip_lib.tower_patch_size(config.model))


def mae_decoder(config, width: int = 128, depth: int = 2, num_heads: int = 4, mlp_dim: int = 0,
                posemb: str = 'sincos2d') -> dict:
  """A `config.model.heads` entry for MAE's decoder (jmm/models/mae_decoder.py) on `config.model.image`'s patches."""
  from jmm.objectives import flip as flip_lib  # pylint: disable=g-import-not-at-top
  return dict(type='mae_decoder', patch_size=flip_lib.tower_patch_size(config.model), width=width, depth=depth,
              num_heads=num_heads, mlp_dim=mlp_dim, posemb=posemb)


def mae(config, mask_ratio: float = 0.75, norm_pix: bool = True, weight: float = 1.0, head: str = 'mae') -> dict:
  """A `config.objectives` entry for MAE (jmm/objectives/mae.py): reconstruct a random `mask_ratio` of each
  image's patches (on `config.model.image`'s grid) with the decoder head `head` (`mae_decoder`)."""
  from jmm.objectives import flip as flip_lib  # pylint: disable=g-import-not-at-top
  return dict(type='mae', weight=weight, mask_ratio=mask_ratio, norm_pix=norm_pix, head=head,
              patch_size=flip_lib.tower_patch_size(config.model))


def base_config(arg) -> ml_collections.ConfigDict:
  """Everything but the objectives: a two-tower model on the data set named by `arg.data`."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.batch_size = arg.batch
  c.log_every = 50
  # A step whose loss or gradient norm is not finite is skipped (params and optimizer state unchanged, counted
  # as 'nonfinite_steps'); this many in a row stop the run (NonFiniteError).
  c.max_nonfinite_steps = 10
  c.dtype = 'float32'              # Compute dtype; parameters stay float32. 'bfloat16' on accelerators.
  c.attention_impl = 'xla'
  # Host malloc for XLA:CPU (jmm/hostmem.py): 'auto' keeps each step's temporaries in the heap instead of
  # page-faulting a fresh mmap every step (about 20% faster steps on CPU); 'default' leaves glibc alone.
  c.host_malloc = 'auto'
  # XLA:CPU matmul library (jmm/cpu_matmuls.py): 'auto' = oneDNN for the training step when training on a CPU
  # (S/16 step 2-6% faster, 6% fewer CPU-seconds than XLA's YNNPACK), checked safe per program; 'xla' = XLA's.
  c.cpu_matmuls = 'auto'
  # Named device mesh (jmm.parallel): 'data=-1' = every device data-parallel. FSDP and tensor parallelism are
  # one override away, e.g. --config.mesh=data=-1,fsdp=8,tensor=2 (pairs [('data', -1), ...] work too).
  c.mesh = 'data=-1,fsdp=1,tensor=1'

  # Synthetic captions are at most 9 tokens with one object; raise text_len with max_objects.
  # short_caption_prob: the fraction of synthetic captions cut to 'a red triangle' (jmm/data/synthetic.py). Off:
  # it raised zero-shot but the towers then ignore position, and retrieval collapsed (benchmarks/NOTES.md).
  c.data = dict(name=arg.data, resolution=arg.res, max_objects=1, text_len=12, seed=0, short_caption_prob=0.0,
                negative_captions='')
  # Hybrid captions (Lai et al. 2024; jmm/data/hybrid_captions.py, configs/hybrid.py): caption fields and their
  # sampling ratios, one drawn per example, e.g. 'alt_text=0.5,caption=0.5' on the synthetic data or
  # 'txt=0.5,json/alt=0.5' on WebDataset shards. '' = the one caption (synthetic: the descriptive 'caption').
  c.data.captions = ''
  # Real data (jmm/data, README "Train on your own data"): name='webdataset' | 'array_record' | 'tfds' |
  # 'mixture'. paths: glob / {000..099} brace patterns, '::'-separated, local or fsspec; keys '' = per-kind
  # defaults (webdataset: jpg/jpeg/png/webp + txt; array_record and tfds: 'image' + 'caption').
  # transform: 'resize' (big_vision SigLIP), 'resize_crop', 'random_resized_crop' (crop_scale of the area).
  c.data.update(paths='', image_key='', caption_key='', tfds_name='', split='train', data_dir='', mixture=(),
                index_cache='',  # webdataset: a folder for per-shard header indexes (skip the scan next time).
                transform='resize', crop_scale=(0.9, 1.0), value_range=(-1.0, 1.0), max_consecutive_bad=1000,
                worker_count=0, num_threads=1, prefetch=2)  # Throughput knobs: Grain processes, threads, batches.
  c.tokenizer = dict(path='', vocab_size=128, train_sentences=20000)  # path='' -> trained and cached.

  c.model = dict(
      name='two_tower',  # jmm/models/two_tower.py.
      image=tower(arg.img, TINY_IMAGE) if arg.img == 'tiny' else tower(arg.img, TINY_IMAGE, pool_type='map'),
      text=tower(arg.txt, TINY_TEXT, pool_type='last'),
      out_dim=128 if arg.img == 'tiny' else 768,
      temperature_init=math.log(10.0),  # SigLIP paper: t' = log 10, b = -10.
      bias_init=-10.0,
      # Locked towers (LiT, Zhai et al. 2022; configs/lit.py): 'image', 'text' or ''. A locked tower gets no
      # gradient and no optimizer state; it needs init_from unless locked_random_ok (tests, benchmarks).
      locked='',
      locked_random_ok=False,
      # The towers built: '' = both; 'image' = the image tower alone (MAE, configs/mae.py: no text, no t / b).
      towers='',
  )
  # Mixture of experts (jmm/models/moe.py, configs/clip_up.py): num_experts=0 is the dense model. Fields: k (top-k),
  # layers ('every_other' = blocks 1, 3, ...; 'all'; 'last_n:N'; '1,3'), towers, capacity_factor (0 = dropless),
  # gating ('softmax_topk' | 'topk_softmax'), renormalize, groups (routing groups; 0 = one per batch shard), impl
  # (grouped matmul), dispatch (expert parallelism: 'capacity' = padded all_to_all; 'ragged' = ragged_all_to_all
  # with capacity_factor=0, emulated on CPU). Its auxiliary losses are the 'moe' objective (configs/clip_up.py).
  c.model.moe = {k: v for k, v in moe.DEFAULTS.items() if k not in ('aux_loss_weight', 'z_loss_weight')}
  # lr: 1e-3 beat 2e-3 and 3e-3 clearly (zero-shot 67% vs 35% and 18% at ~500 steps), and 5e-4 (61%).
  # wd (AdamW's, multiplied by the lr): 0.1 gave 81.7% zero-shot against 78.0% with 1e-4 (single runs, 2026-11-24).
  c.optim = dict(name='adamw', lr=1e-3, wd=0.1, b1=0.9, b2=0.95, eps=1e-8, warmup_steps=100,
                 schedule='cosine', min_lr_ratio=0.0, clip_norm=1.0, frozen=())
  c.checkpoint = dict(every=500, keep=2)
  c.checkpoint['async'] = True
  # Resuming checks the workdir's config.json against this config (model, objectives, optim, data, seeds...)
  # and refuses a mismatch; False resumes anyway.
  c.resume_check = True
  # Initial parameters (a fresh run only): a jmm workdir, or a .npz from `python -m jmm.convert.import_weights`.
  c.init_from = ''
  # The towers init_from loads ('image', 'text', 'image,text'); the rest is freshly initialised. '' = everything.
  c.init_from_towers = ''

  # Evaluators (jmm/evaluators) and the data each reads: the synthetic held-out split (seed 1) by default.
  heldout = dict(name='synthetic', split='test', resolution=arg.res, seed=1, max_objects=1)
  c.evals = dict(
      zeroshot=dict(type='synthetic_zeroshot', every=1000, batch_size=250, text_len=12,
                    data=dict(heldout, num_examples=2000)),
      retrieval=dict(type='retrieval', every=0, batch_size=250, text_len=12, data=dict(heldout, num_examples=1000)),
      linear_probe=dict(type='linear_probe', every=0, batch_size=250, data=dict(heldout, num_examples=1000),
                        train_data=dict(heldout, split='train', num_examples=2000)),
  )
  # Test hooks: SIGKILL itself after the checkpoint of a step; SIGTERM one process at a step.
  c.debug = dict(kill_at_step=-1, sigterm_at_step=-1, sigterm_process=0)
  return c


def from_weights(config: ml_collections.ConfigDict, weights: str, tokenizer: str) -> ml_collections.ConfigDict:
  """Fits `config` to converted weights (a `.npz` from `python -m jmm.convert.import_weights`): their model,
  loss, resolution and text length; their preprocessing (resize mode for file eval data; the image tower's
  pixel normalisation) and text conventions (padding, SigLIP's canonicalisation); init_from = the weights."""
  from jmm import convert  # pylint: disable=g-import-not-at-top
  from jmm.config import ConfigError  # pylint: disable=g-import-not-at-top
  if not weights:
    raise ConfigError('weights= is empty: give a .npz from python -m jmm.convert.import_weights')
  spec = convert.read_spec(weights)
  config.model = ml_collections.ConfigDict({'name': 'two_tower', **spec['model'], 'locked': config.model.locked,
                                           'locked_random_ok': config.model.locked_random_ok})
  config.data.resolution = spec['resolution']
  config.data.text_len = spec['text_len']
  # Older .npz files (before the spec recorded preprocessing) get the family's conventions.
  pre = spec.get('preprocess') or {'transform': 'resize'}
  tok = spec.get('tokenizer') or {'pad_id': 1 if spec['format'] in ('hf_siglip', 'big_vision') else 0,
                                  'canonicalize': False}
  for ev in config.evals.values():
    ev.text_len = spec['text_len']
    for data in (ev.get('data'), ev.get('train_data')):
      if data is not None:
        data.resolution = spec['resolution']
        if data.get('name') != 'synthetic':
          data.transform = pre['transform']
  config.objectives = {spec['loss']: contrastive(spec['loss'])}
  config.init_from = weights
  config.tokenizer.path = tokenizer
  # Released SigLIP texts are padded with eos (big_vision pad_value=1; HF SiglipTokenizer pads with '</s>') and
  # canonicalised (lower-case, no punctuation).
  config.tokenizer.pad_id = tok['pad_id']
  config.tokenizer.canonicalize = tok['canonicalize']
  return config


def eval_config(weights: str, tokenizer: str, evals: dict) -> ml_collections.ConfigDict:
  """A config for `python -m jmm.evaluate` on converted weights (configs/eval/): the model, tokenizer and
  preprocessing of `weights` (`from_weights`) and the given `config.evals`; nothing is trained."""
  from jmm import convert  # pylint: disable=g-import-not-at-top
  from jmm.config import ConfigError  # pylint: disable=g-import-not-at-top
  if not weights:
    raise ConfigError('weights= is empty: give a .npz from python -m jmm.convert.import_weights')
  arg = ml_collections.ConfigDict(dict(data='synthetic', steps=1, batch=1, img='tiny', txt='tiny',
                                       res=convert.read_spec(weights)['resolution']))
  config = base_config(arg)
  config.evals = evals
  return from_weights(config, weights, tokenizer)
