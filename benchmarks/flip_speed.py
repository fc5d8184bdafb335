"""FLIP's speed-up: image-tower forward + backward and whole training step at several patch mask ratios.

  python benchmarks/flip_speed.py              # the default recipe's sizes, then ViT-S/16 at 224 px (CPU: ~2 min)
  python benchmarks/flip_speed.py --quick      # tiny shapes, one round: a smoke run
  python benchmarks/flip_speed.py --sizes=s16 --ratios=0,0.5,0.75 --rounds=5 --steps=3

For each size, every mask ratio gets two compiled programs: the image tower's forward and backward alone (the
gradient of its embeddings' sum w.r.t. its params, on the kept patches) and jmm's real training step with the FLIP
objective (`configs/flip.py`: data, towers, optimizer and loss as trained, synthetic batches). Ratio 0 is the
unmasked baseline (the plain SigLIP step: FLIP at ratio 0 adds nothing to the batch). The ratios then take turns
(A B C A B C ...), each turn timing `--steps` calls, so machine noise hits all of them alike. Reports per ratio
and program the median time, min / max spread and the speed-up against ratio 0 (the paper, Li et al. 2023:
~2x / ~3-4x less image-encoder compute at 50% / 75%); writes JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# Sizes: the config argument string of configs/flip.py, and what else is changed.
SIZES = {
    'default': dict(arg='batch=64,res=48', note='the default recipe: tiny towers, 48 px, 8 px patches, batch 64'),
    's16': dict(arg='img=S/16,txt=tiny,res=224,batch=16', note='ViT-S/16 image tower at 224 px, tiny text, batch 16'),
    'tiny': dict(arg='batch=4,res=16', depth=1, note='smoke run: 16 px, one block per tower, batch 4'),
}


def build(size: dict, ratio: float):
  """(image-tower fwd+bwd fn, its args, train step, state, batch, info) for one size and mask ratio."""
  from configs import flip as flip_config  # pylint: disable=g-import-not-at-top
  from jmm import cpu_matmuls  # pylint: disable=g-import-not-at-top
  from jmm.objectives import flip  # pylint: disable=g-import-not-at-top
  config = flip_config.get_config(f'{size["arg"]},mask={ratio}')
  if size.get('depth'):
    config.model.image.depth = config.model.text.depth = size['depth']
  vocab = config.tokenizer.vocab_size
  step, state, batch, model, info = common.build_train_step(config, vocab, config.batch_size, with_info=True)

  # The image tower alone: d/d params of sum(embeddings) on the kept patches (the masked part of the step); the
  # batch has no text, so the text tower does not run.
  section = config.objectives.flip
  img = batch['image']
  h, w = img.shape[1] // section.patch_size[0], img.shape[2] // section.patch_size[1]
  keep = None
  if ratio:
    keep = flip.keep_indices(jax.random.key(0), img.shape[0], h * w, flip.num_kept(h * w, ratio))
  params = jax.tree.map(jnp.copy, state['params'])  # Its own copy: the train step donates the state's.

  def tower_loss(img_params, params, image, keep):
    out = model.apply({'params': {**params, 'img': img_params}}, {'image': image, 'image_keep': keep})
    return jnp.sum(out['zimg'])

  options = cpu_matmuls.compiler_options(config.get('cpu_matmuls', 'auto')) if info['matmuls'] == 'onednn' else None
  tower_fn = jax.jit(jax.grad(tower_loss), compiler_options=options or None)
  return tower_fn, (params['img'], params, img, keep), step, state, batch, {
      'matmuls': info['matmuls'], 'kept': keep.shape[1] if keep is not None else h * w, 'patches': h * w}


def run_size(name: str, size: dict, ratios: list[float], rounds: int, steps: int, warmup: int) -> dict:
  """Builds every ratio's two programs, then times them in interleaved turns; returns the size's record."""
  runs = {}
  for ratio in ratios:
    t0 = time.perf_counter()
    tower_fn, tower_args, step, state, batch, info = build(size, ratio)
    holder = {'state': state}

    def step_once(step=step, batch=batch, holder=holder):
      holder['state'], metrics = step(holder['state'], batch)
      jax.block_until_ready(metrics)

    def tower_once(fn=tower_fn, args=tower_args):
      jax.block_until_ready(fn(*args))

    for _ in range(max(warmup, 1)):  # The first call compiles.
      tower_once()
      step_once()
    runs[ratio] = dict(info, tower=tower_once, step=step_once, tower_s=[], step_s=[],
                       build_s=time.perf_counter() - t0)
    print(f'  {name}: mask {ratio:g} built and warmed up in {runs[ratio]["build_s"]:.1f} s '
          f'({info["kept"]} of {info["patches"]} patches)', flush=True)
  load_before = common.load_average()
  for _ in range(rounds):  # A B C A B C: each turn both programs of one ratio.
    for ratio in ratios:
      r = runs[ratio]
      r['tower_s'] += common.time_calls(r['tower'], 0, steps)
      r['step_s'] += common.time_calls(r['step'], 0, steps)
  out = {'note': size['note'], 'load_before': load_before, 'load_after': common.load_average(), 'ratios': {}}
  base = runs[ratios[0]]
  for ratio in ratios:
    r = runs[ratio]
    tower, step = common.summarize(r['tower_s']), common.summarize(r['step_s'])
    out['ratios'][str(ratio)] = {
        'kept_patches': r['kept'], 'patches': r['patches'], 'matmuls': r['matmuls'], 'build_s': r['build_s'],
        'tower_fwd_bwd': tower, 'step': step,
        'tower_speedup': common.summarize(base['tower_s'])['median_s'] / tower['median_s'],
        'step_speedup': common.summarize(base['step_s'])['median_s'] / step['median_s']}
  return out


def table(results: dict) -> str:
  """The results as a text table; x = speed-up against the first ratio; matmuls: the step's CPU matmul library
  (oneDNN where `jmm.cpu_matmuls` found it safe for that program, else XLA's), which differs between ratios only
  at toy sizes."""
  lines = [f'{"size":8} {"mask":>5} {"kept":>8} {"tower f+b ms":>13} {"spread":>7} {"x":>6} '
           f'{"step ms":>9} {"spread":>7} {"x":>6}  matmuls']
  for name, res in results.items():
    for ratio, r in res['ratios'].items():
      t, s = r['tower_fwd_bwd'], r['step']
      lines.append(f'{name:8} {float(ratio):5.2f} {r["kept_patches"]:>4}/{r["patches"]:<3} '
                   f'{t["median_s"] * 1e3:13.1f} {100 * t["spread"]:6.0f}% {r["tower_speedup"]:6.2f} '
                   f'{s["median_s"] * 1e3:9.1f} {100 * s["spread"]:6.0f}% {r["step_speedup"]:6.2f}  {r["matmuls"]}')
  return '\n'.join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny shapes, one round, one step per turn')
  parser.add_argument('--sizes', default=None, help=f'comma-separated, of {sorted(SIZES)} (default: default,s16)')
  parser.add_argument('--ratios', default='0,0.5,0.75', help='mask ratios; the first is the baseline')
  parser.add_argument('--rounds', type=int, default=None, help='turns per ratio (default 3; quick 1)')
  parser.add_argument('--steps', type=int, default=None, help='timed calls per turn (default 2; quick 1)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls per program (the first compiles)')
  parser.add_argument('--out', default=None, help='JSON file (default benchmarks/results/flip_speed[_quick].json)')
  args = parser.parse_args(argv)
  sizes = (args.sizes or ('tiny' if args.quick else 'default,s16')).split(',')
  unknown = [s for s in sizes if s not in SIZES]
  if unknown:
    parser.error(f'unknown --sizes {unknown}; known: {sorted(SIZES)}')
  ratios = [float(r) for r in args.ratios.split(',')]
  rounds = args.rounds or (1 if args.quick else 3)
  steps = args.steps or (1 if args.quick else 2)
  results = {}
  for name in sizes:
    results[name] = run_size(name, SIZES[name], ratios, rounds, steps, args.warmup)
  print(table(results), flush=True)
  record = {'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'machine': common.machine_info(),
            'quick': args.quick, 'rounds': rounds, 'steps': steps, 'sizes': results}
  out = args.out or os.path.join(common.ROOT, 'benchmarks', 'results',
                                 f'flip_speed{"_quick" if args.quick else ""}.json')
  common.write_json(out, record)
  print(f'wrote {out}', flush=True)
  return record


if __name__ == '__main__':
  main()
