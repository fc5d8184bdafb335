"""EViT's speed-up: image-tower forward + backward and whole training step at several keep rates.

  python benchmarks/evit_speed.py              # the default recipe's sizes, then ViT-S/16 at 224 px (CPU: ~3 min)
  python benchmarks/evit_speed.py --quick      # tiny shapes, one round: a smoke run
  python benchmarks/evit_speed.py --sizes=s16 --keeps=1,0.7,0.5 --layers=3+6+9 --rounds=5 --steps=3

For each size, every keep rate gets two compiled programs: the image tower's forward and backward alone (the
gradient of its embeddings' sum w.r.t. its params) and jmm's real training step (`configs/evit.py`: data, towers,
optimizer and loss as trained, synthetic batches). Keep 1 is EViT off (the plain SigLIP step, bit for bit). The
keep rates then take turns (A B C A B C ...), each turn timing `--steps` calls, so machine noise hits all of them
alike. Reports per keep rate and program the median time, min / max spread, the speed-up against the first keep
rate and the analytic image-encoder FLOPs ratio (`jmm.flops`); writes JSON under benchmarks/results/. The paper
(Liang et al. 2022), DeiT-S at keep 0.7 in blocks 4, 7, 10: about 50% more images/s at inference.
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

# Sizes: the config argument string of configs/evit.py, and what else is changed.
SIZES = {
    'default': dict(arg='batch=64,res=48', note='the default recipe: tiny towers, 48 px, 8 px patches, batch 64'),
    's16': dict(arg='img=S/16,txt=tiny,res=224,batch=8',
                note='ViT-S/16 image tower (MAP) at 224 px, tiny text, batch 8'),
    'tiny': dict(arg='batch=4,res=16', depth=2, note='smoke run: 16 px, two blocks per tower, batch 4'),
}


def build(size: dict, keep: float, layers: str):
  """(image-tower fwd+bwd fn, its args, train step, state, batch, info) for one size and keep rate."""
  from configs import evit as evit_config  # pylint: disable=g-import-not-at-top
  from jmm import cpu_matmuls  # pylint: disable=g-import-not-at-top
  from jmm import flops  # pylint: disable=g-import-not-at-top
  from jmm.models import evit  # pylint: disable=g-import-not-at-top
  from jmm.models import variants  # pylint: disable=g-import-not-at-top
  config = evit_config.get_config(f'{size["arg"]},keep={keep},layers={layers}')
  if size.get('depth'):
    config.model.image.depth = config.model.text.depth = size['depth']
  vocab = config.tokenizer.vocab_size
  step, state, batch, model, info = common.build_train_step(config, vocab, config.batch_size, with_info=True)
  params = jax.tree.map(jnp.copy, state['params'])  # Its own copy: the train step donates the state's.

  def tower_loss(img_params, params, image):  # No text in the batch: the text tower does not run.
    return jnp.sum(model.apply({'params': {**params, 'img': img_params}}, {'image': image})['zimg'])

  options = cpu_matmuls.compiler_options(config.get('cpu_matmuls', 'auto')) if info['matmuls'] == 'onednn' else None
  tower_fn = jax.jit(jax.grad(tower_loss), compiler_options=options or None)
  parts = flops.model_flops(config)['image_parts']
  image = config.model.image
  cls = image.get('pool_type') == 'tok'
  res, patch = config.data.resolution, (image.get('patch_size') or (16, 16))
  depth = image.get('depth') or variants.decode_variant(image.variant)['depth']
  tokens = (res // patch[0]) * (res // patch[1]) + int(cls)
  layer_ids, rate = evit.parse(image.evit, depth)
  counts = [t for _, _, t in evit.schedule(tokens, depth, layer_ids, rate, cls)]
  return tower_fn, (params['img'], params, batch['image']), step, state, batch, {
      'matmuls': info['matmuls'], 'tokens': [tokens] + counts, 'encoder_flops': parts['encoder']}


def run_size(name: str, size: dict, keeps: list[float], layers: str, rounds: int, steps: int, warmup: int) -> dict:
  """Builds every keep rate's two programs, then times them in interleaved turns; returns the size's record."""
  runs = {}
  for keep in keeps:
    t0 = time.perf_counter()
    tower_fn, tower_args, step, state, batch, info = build(size, keep, layers)
    holder = {'state': state}

    def step_once(step=step, batch=batch, holder=holder):
      holder['state'], metrics = step(holder['state'], batch)
      jax.block_until_ready(metrics)

    def tower_once(fn=tower_fn, args=tower_args):
      jax.block_until_ready(fn(*args))

    for _ in range(max(warmup, 1)):  # The first call compiles.
      tower_once()
      step_once()
    runs[keep] = dict(info, tower=tower_once, step=step_once, tower_s=[], step_s=[],
                      build_s=time.perf_counter() - t0)
    print(f'  {name}: keep {keep:g} built and warmed up in {runs[keep]["build_s"]:.1f} s (tokens per block '
          f'{info["tokens"]})', flush=True)
  load_before = common.load_average()
  for _ in range(rounds):  # A B C A B C: each turn both programs of one keep rate.
    for keep in keeps:
      r = runs[keep]
      r['tower_s'] += common.time_calls(r['tower'], 0, steps)
      r['step_s'] += common.time_calls(r['step'], 0, steps)
  out = {'note': size['note'], 'layers': layers, 'load_before': load_before, 'load_after': common.load_average(),
         'keeps': {}}
  base = runs[keeps[0]]
  for keep in keeps:
    r = runs[keep]
    tower, step = common.summarize(r['tower_s']), common.summarize(r['step_s'])
    out['keeps'][str(keep)] = {
        'tokens_per_block': r['tokens'], 'matmuls': r['matmuls'], 'build_s': r['build_s'],
        'tower_fwd_bwd': tower, 'step': step, 'encoder_flops_ratio': r['encoder_flops'] / base['encoder_flops'],
        'tower_speedup': common.summarize(base['tower_s'])['median_s'] / tower['median_s'],
        'step_speedup': common.summarize(base['step_s'])['median_s'] / step['median_s']}
  return out


def table(results: dict) -> str:
  """The results as a text table; x = speed-up against the first keep rate, flops = the image encoder's analytic
  FLOPs against the first's; tokens: entering the encoder -> leaving it."""
  lines = [f'{"size":8} {"keep":>5} {"tokens":>9} {"flops":>6} {"tower f+b ms":>13} {"spread":>7} {"x":>6} '
           f'{"step ms":>9} {"spread":>7} {"x":>6}  matmuls']
  for name, res in results.items():
    for keep, r in res['keeps'].items():
      t, s = r['tower_fwd_bwd'], r['step']
      tokens = f'{r["tokens_per_block"][0]}->{r["tokens_per_block"][-1]}'
      lines.append(f'{name:8} {float(keep):5.2f} {tokens:>9} {r["encoder_flops_ratio"]:6.2f} '
                   f'{t["median_s"] * 1e3:13.1f} {100 * t["spread"]:6.0f}% {r["tower_speedup"]:6.2f} '
                   f'{s["median_s"] * 1e3:9.1f} {100 * s["spread"]:6.0f}% {r["step_speedup"]:6.2f}  {r["matmuls"]}')
  return '\n'.join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny shapes, one round, one step per turn')
  parser.add_argument('--sizes', default=None, help=f'comma-separated, of {sorted(SIZES)} (default: default,s16)')
  parser.add_argument('--keeps', default='1,0.7,0.5', help='keep rates; the first is the baseline (1 = EViT off)')
  parser.add_argument('--layers', default='quarters', help="reorganisation blocks, '+'-separated, or 'quarters'")
  parser.add_argument('--rounds', type=int, default=None, help='turns per keep rate (default 3; quick 1)')
  parser.add_argument('--steps', type=int, default=None, help='timed calls per turn (default 2; quick 1)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls per program (the first compiles)')
  parser.add_argument('--out', default=None, help='JSON file (default benchmarks/results/evit_speed[_quick].json)')
  args = parser.parse_args(argv)
  sizes = (args.sizes or ('tiny' if args.quick else 'default,s16')).split(',')
  unknown = [s for s in sizes if s not in SIZES]
  if unknown:
    parser.error(f'unknown --sizes {unknown}; known: {sorted(SIZES)}')
  keeps = [float(k) for k in args.keeps.split(',')]
  rounds = args.rounds or (1 if args.quick else 3)
  steps = args.steps or (1 if args.quick else 2)
  results = {}
  for name in sizes:
    results[name] = run_size(name, SIZES[name], keeps, args.layers, rounds, steps, args.warmup)
  print(table(results), flush=True)
  record = {'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'machine': common.machine_info(),
            'quick': args.quick, 'rounds': rounds, 'steps': steps, 'sizes': results}
  out = args.out or os.path.join(common.ROOT, 'benchmarks', 'results',
                                 f'evit_speed{"_quick" if args.quick else ""}.json')
  common.write_json(out, record)
  print(f'wrote {out}', flush=True)
  return record


if __name__ == '__main__':
  main()
