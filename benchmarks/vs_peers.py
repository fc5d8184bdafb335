"""jmm's training step against HF transformers' SiglipModel and open_clip: same size, batch, machine and run.

  python benchmarks/vs_peers.py                      # ViT-S/16-class towers, batch 16, float32, CPU
  python benchmarks/vs_peers.py --size=tiny --rounds=1 --steps=1   # a smoke run
  python benchmarks/vs_peers.py --pool=2ee5ab2,209d100   # no run: every turn of the recorded runs of these commits

Each side builds its model once, compiles / warms up, then the sides take turns (A B C A B C ...), each turn
timing `--steps` full training steps (forward, sigmoid loss, backward, AdamW update), so machine noise hits all
sides alike. Reports the median step time per side, images/s, and the throughput ratio jmm / peer (above 1:
jmm is faster), both as the ratio of the overall medians and as the median of per-turn ratios (each peer turn
against the jmm turn just before it, less exposed to the machine's drift), with the load average before and after
(the machine may be shared). One run on a noisy VM moves by +-5%; `--pool` reads the results file instead of
running, and pools the per-turn ratios of every recorded run of the given commits (the same code measured at
different times): their median with a bootstrap 90% interval, and the share of turns in which jmm was faster.
On GPU when
`--device=gpu` (torch on CUDA, JAX on its default GPU backend).

What is matched. Sizes: width, depth, heads, MLP, patch, resolution, text length, vocabulary, float32, and the
optimizer step: jmm's recipe clips gradients to a global norm (configs/common.py, clip_norm=1.0) before AdamW, so
the peers do too (torch.nn.utils.clip_grad_norm_) with AdamW's betas and weight decay from the same config.
HF SigLIP: MAP-pooled image tower without a projection, last-token text pooling with a linear head; jmm is
configured the same (image out_dim=0, text out_dim=width), so the FLOPs agree to within the head biases.
open_clip's CLIP (`open_clip.model.CLIP` with init_logit_bias, the SigLIP loss) has a class token instead of
MAP pooling, a pre-LN and a causal text mask, and projects both towers; its FLOPs differ by about 2%.
"""
from __future__ import annotations

import os
import random
import resource
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import plot_results  # noqa: E402

SIZES = {
    # ViT-S/16-class towers for both modalities (the comparison size).
    'S': dict(width=384, depth=12, num_heads=6, mlp_dim=1536, patch=16, res=224, text_len=64, vocab=32000),
    'B': dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch=16, res=224, text_len=64, vocab=32000),
    # For tests and smoke runs.
    'tiny': dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch=8, res=32, text_len=8, vocab=128),
}

_SIZE = flags.DEFINE_enum('size', 'S', list(SIZES), 'Tower size for every side.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Turns per side (A B A B ...).')
_STEPS = flags.DEFINE_integer('steps', 2, 'Timed steps per turn.')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps per side before the first turn (after compiling).')
_PEERS = flags.DEFINE_list('peers', ['hf', 'open_clip'], 'Peers to run: hf, open_clip.')
_THREADS = flags.DEFINE_integer('threads', None, 'torch intra-op threads (default: the CPU core count).')
_DEVICE = flags.DEFINE_enum('device', 'cpu', ['cpu', 'gpu'], 'Where both sides run.')
_OUT = flags.DEFINE_string('out', os.path.join(common.ROOT, 'benchmarks', 'results', 'vs_peers_latest.json'),
                           'JSON file for this run.')
_POOL = flags.DEFINE_list('pool', [], 'Run nothing: pool the per-turn ratios of the runs in --results whose git '
                          'commit (machine.git, a "+dirty" suffix ignored) is one of these prefixes.')
_RESULTS = flags.DEFINE_string('results', os.path.join(common.ROOT, 'benchmarks', 'results', 'vs_peers.jsonl'),
                               'Results file: one JSON line appended per run ("" = none).')


# ---------------------------------------------------------------------------------------------------------
# jmm.
# ---------------------------------------------------------------------------------------------------------
def jmm_config(size: dict, batch: int):
  """A jmm SigLIP config with HF SiglipModel's layout at `size` (MAP image pooling without head, text head)."""
  config = common.load_config(f'configs/siglip.py:res={size["res"]},batch={batch}')
  tower = dict(width=size['width'], depth=size['depth'], mlp_dim=size['mlp_dim'], num_heads=size['num_heads'])
  config.model.image = dict(tower, patch_size=(size['patch'], size['patch']), pool_type='map', out_dim=0)
  config.model.text = dict(tower, pool_type='last')
  config.objectives.sigmoid.hard_negatives = False  # The peers compute plain SigLIP.
  config.model.out_dim = size['width']
  config.data.text_len = size['text_len']
  config.dtype = 'float32'
  return config


def make_jmm(size: dict, batch: int):
  """(step_fn, info) for jmm: step_fn runs one real training step and blocks until it is done."""
  import jax  # pylint: disable=g-import-not-at-top
  from jmm import flops as flops_lib  # pylint: disable=g-import-not-at-top
  config = jmm_config(size, batch)
  step, state, data, _, build_info = common.build_train_step(config, size['vocab'], batch, with_info=True)
  compiled = step.lower(state, data).compile()
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], data)
    jax.block_until_ready(metrics)

  params = sum(x.size for x in jax.tree.leaves(holder['state']['params']))
  return run, {'params': int(params), 'train_flops': flops_lib.model_flops(config, batch)['train_step'],
               'jax': jax.__version__, 'device': jax.devices()[0].device_kind, 'matmuls': build_info['matmuls']}


# ---------------------------------------------------------------------------------------------------------
# Peers (PyTorch).
# ---------------------------------------------------------------------------------------------------------
def import_torch_stack():
  """Imports torch, working around a torchvision whose C++ ops do not match the installed torch.

  A CUDA torchvision wheel beside a CPU torch fails at import ('operator torchvision::nms does not exist'),
  and transformers / open_clip import torchvision. Neither peer model needs torchvision's ops, so on that error
  the module registering them is stubbed out and the import retried.
  """
  import torch  # pylint: disable=g-import-not-at-top
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  except RuntimeError as e:
    if 'torchvision::' not in str(e):
      raise
    for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
      del sys.modules[name]
    sys.modules['torchvision._meta_registrations'] = types.ModuleType('torchvision._meta_registrations')
    import torchvision  # noqa: F401,F811  pylint: disable=g-import-not-at-top,unused-import
  return torch


def _torch_runner(torch, model, loss_fn, batch: int, size: dict, device: str):
  """(step_fn, param count) for a torch model: forward, `loss_fn(model, images, tokens)`, backward, gradient
  clipping to jmm's global norm, AdamW: the same work as jmm's step (configs/common.py: AdamW, clip_norm)."""
  model = model.to(device).train()
  optim_config = jmm_config(size, batch).optim
  clip_norm = optim_config.get('clip_norm')
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(optim_config.b1, optim_config.b2),
                          weight_decay=optim_config.wd)
  gen = torch.Generator().manual_seed(0)
  images = torch.rand(batch, 3, size['res'], size['res'], generator=gen).mul(2).sub(1).to(device)
  tokens = torch.randint(0, size['vocab'], (batch, size['text_len']), generator=gen).to(device)

  def run():
    loss = loss_fn(model, images, tokens)
    loss.backward()
    if clip_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == 'cuda':
      torch.cuda.synchronize()

  return run, int(sum(p.numel() for p in model.parameters()))


def make_hf(size: dict, batch: int, device: str):
  """(step_fn, info) for HF transformers' SiglipModel (sdpa attention, its own sigmoid loss)."""
  torch = import_torch_stack()
  import transformers  # pylint: disable=g-import-not-at-top
  tower = dict(hidden_size=size['width'], intermediate_size=size['mlp_dim'], num_hidden_layers=size['depth'],
               num_attention_heads=size['num_heads'])
  config = transformers.SiglipConfig(
      text_config=dict(tower, vocab_size=size['vocab'], max_position_embeddings=size['text_len'],
                       projection_size=size['width'], bos_token_id=None, eos_token_id=None, pad_token_id=0),
      vision_config=dict(tower, image_size=size['res'], patch_size=size['patch']))
  model = transformers.SiglipModel(config)

  def loss_fn(m, images, tokens):
    return m(input_ids=tokens, pixel_values=images, return_loss=True).loss

  run, params = _torch_runner(torch, model, loss_fn, batch, size, device)
  return run, {'params': params, 'torch': torch.__version__, 'transformers': transformers.__version__,
               'attention': model.config._attn_implementation}  # pylint: disable=protected-access


def make_open_clip(size: dict, batch: int, device: str):
  """(step_fn, info) for open_clip's CLIP model with a SigLIP logit bias and open_clip's SigLipLoss."""
  torch = import_torch_stack()
  import open_clip  # pylint: disable=g-import-not-at-top
  from open_clip import loss as oc_loss  # pylint: disable=g-import-not-at-top
  head_width = size['width'] // size['num_heads']
  model = open_clip.model.CLIP(
      embed_dim=size['width'],
      vision_cfg=open_clip.model.CLIPVisionCfg(layers=size['depth'], width=size['width'], head_width=head_width,
                                               mlp_ratio=size['mlp_dim'] / size['width'],
                                               patch_size=size['patch'], image_size=size['res']),
      text_cfg=open_clip.model.CLIPTextCfg(context_length=size['text_len'], vocab_size=size['vocab'],
                                           width=size['width'], heads=size['num_heads'], layers=size['depth']),
      init_logit_scale=2.302585, init_logit_bias=-10.0, output_dict=True)
  siglip_loss = oc_loss.SigLipLoss()

  def loss_fn(m, images, tokens):
    out = m(images, tokens)
    return siglip_loss(out['image_features'], out['text_features'], out['logit_scale'], out['logit_bias'])

  run, params = _torch_runner(torch, model, loss_fn, batch, size, device)
  return run, {'params': params, 'torch': torch.__version__, 'open_clip': open_clip.__version__}


# ---------------------------------------------------------------------------------------------------------
# The comparison.
# ---------------------------------------------------------------------------------------------------------
def compare(size_name: str, batch: int, rounds: int, steps: int, warmup: int, peers, device: str = 'cpu',
            threads: int | None = None) -> dict:
  """Builds every side, then alternates timed turns; returns the result record (see the module docstring)."""
  size = SIZES[size_name]
  torch_device = 'cuda' if device == 'gpu' else 'cpu'
  threads = threads or os.cpu_count()
  builders = {'jmm': lambda: make_jmm(size, batch)}
  if 'hf' in peers:
    builders['hf'] = lambda: make_hf(size, batch, torch_device)
  if 'open_clip' in peers:
    builders['open_clip'] = lambda: make_open_clip(size, batch, torch_device)
  if set(peers) - {'hf', 'open_clip'}:
    raise ValueError(f'--peers: unknown {sorted(set(peers) - {"hf", "open_clip"})}; known: hf, open_clip')
  if len(builders) > 1:
    torch = import_torch_stack()
    torch.set_num_threads(threads)
  sides, info, skipped = {}, {}, {}
  for name, build in builders.items():
    try:
      start = time.perf_counter()
      run, info[name] = build()
      common.time_calls(run, 1 + warmup, 0)  # The first call compiles (jmm) or allocates (torch).
      info[name]['setup_s'] = time.perf_counter() - start
      sides[name] = run
      print(f'{name}: built and warmed up in {info[name]["setup_s"]:.1f} s', file=sys.stderr, flush=True)
    except ImportError as e:  # A peer library missing is reported, not fatal.
      skipped[name] = f'{type(e).__name__}: {e}'
      info.pop(name, None)
  load_before = common.load_average()
  times = {name: [] for name in sides}
  cpu = {name: [] for name in sides}
  faults = {name: [] for name in sides}  # Minor page faults: fresh memory touched (jmm/hostmem.py).
  for turn in range(rounds):
    for name, run in sides.items():
      for _ in range(steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, t0 = time.process_time(), time.perf_counter()
        run()
        times[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)
        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
      print(f'turn {turn + 1}/{rounds} {name}: {times[name][-1]:.3f} s', file=sys.stderr, flush=True)
  results = {}
  for name in sides:
    med = statistics.median(times[name])
    results[name] = {**common.summarize(times[name]), 'images_per_s': batch / med,
                     'cpu_s_median': statistics.median(cpu[name]),
                     'page_faults_median': statistics.median(faults[name]), **info[name]}
  ratios = {f'jmm/{name}': results[name]['median_s'] / results['jmm']['median_s']
            for name in results if name != 'jmm'}
  paired = {f'jmm/{name}': per_turn_ratios(times['jmm'], times[name], steps) for name in results if name != 'jmm'}
  return {'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'size': size_name, **size,
          'batch': batch, 'dtype': 'float32', 'device': device, 'threads': {'torch': threads, 'cpu_count':
                                                                            os.cpu_count()},
          'rounds': rounds, 'steps_per_turn': steps, 'machine': common.machine_info(),
          'load_before': load_before, 'load_after': common.load_average(), 'sides': results,
          'throughput_ratio': ratios, 'per_turn_ratio': paired, 'skipped': skipped}


def turn_values(jmm_times, peer_times, steps: int) -> list[float]:
  """Throughput jmm / peer of each turn: the peer's median step time over jmm's, turn by turn."""
  turns = min(len(jmm_times), len(peer_times)) // steps
  return [statistics.median(peer_times[t * steps:(t + 1) * steps]) /
          statistics.median(jmm_times[t * steps:(t + 1) * steps]) for t in range(turns)]


def per_turn_ratios(jmm_times, peer_times, steps: int) -> dict:
  """Throughput jmm / peer turn by turn (each turn's median step time, the peer's turn right after jmm's).

  The VM's speed drifts over minutes; a turn and its neighbour run within seconds of each other, so the median
  of the per-turn ratios is less exposed to the drift than the ratio of the overall medians. Both are reported.
  """
  values = turn_values(jmm_times, peer_times, steps)
  turns = len(values)
  if not values:
    return {'median': float('nan'), 'min': float('nan'), 'max': float('nan'), 'turns': 0}
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values), 'turns': turns}


def turn_ratios(record: dict, peer: str) -> list[float]:
  """Every per-turn throughput ratio jmm / `peer` of one result record (its steps' times, `all_s`)."""
  sides, steps = record.get('sides', {}), record.get('steps_per_turn', 1)
  if 'jmm' not in sides or peer not in sides:
    return []
  return turn_values(sides['jmm']['all_s'], sides[peer]['all_s'], steps)


def pool_runs(records: list[dict], commits, resamples: int = 4000, seed: int = 0) -> dict:
  """Per-turn ratios pooled over the records whose commit (machine.git without '+dirty') starts with one of
  `commits`: {'runs', 'commits' and, per peer, {'turns', 'median', 'ci90' (bootstrap interval of the median),
  'faster_share' (share of turns with ratio >= 1)}}. Raises ValueError when no record matches."""
  chosen = [r for r in records
            if any(r.get('machine', {}).get('git', '').split('+')[0].startswith(c) for c in commits)]
  if not chosen:
    raise ValueError(f'--pool: no recorded run of commit(s) {", ".join(commits)} in the results file')
  sizes = sorted({f'{r.get("size")}/batch {r.get("batch")}/{r.get("device")}' for r in chosen})
  if len(sizes) > 1:
    raise ValueError(f'--pool: the runs of {", ".join(commits)} measured different set-ups ({"; ".join(sizes)}); '
                     'pool one at a time (a results file per set-up)')
  peers = sorted({name for r in chosen for name in r.get('sides', {}) if name != 'jmm'})
  out = {'runs': len(chosen), 'commits': sorted({r['machine']['git'] for r in chosen}),
         'sizes': sizes}
  rng = random.Random(seed)
  for peer in peers:
    values = [v for r in chosen for v in turn_ratios(r, peer)]
    if not values:
      continue
    boot = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    out[f'jmm/{peer}'] = {'turns': len(values), 'median': statistics.median(values),
                          'ci90': [boot[int(0.05 * resamples)], boot[int(0.95 * resamples) - 1]],
                          'faster_share': sum(v >= 1.0 for v in values) / len(values)}
  return out


def format_pool(p: dict) -> str:
  """`pool_runs`'s result as lines of text."""
  lines = [f'{p["runs"]} runs of {", ".join(p["commits"])} ({"; ".join(p["sizes"])}), every turn pooled:']
  for key, v in p.items():
    if key.startswith('jmm/'):
      lines.append(f'throughput {key}: per-turn median {v["median"]:.3f} (bootstrap 90% interval '
                   f'{v["ci90"][0]:.3f}-{v["ci90"][1]:.3f}) over {v["turns"]} turns; jmm faster in '
                   f'{v["faster_share"]:.0%} of them')
  return '\n'.join(lines)


def format_record(r: dict) -> str:
  """The comparison as a small table."""
  lines = [f'{r["size"]} towers (width {r["width"]}, depth {r["depth"]}, {r["res"]} px, {r["text_len"]} tokens), '
           f'batch {r["batch"]}, {r["dtype"]}, {r["device"]} ({r["machine"]["cpu"]}, {r["machine"]["cpu_count"]} '
           f'cores), load {r["load_before"]} -> {r["load_after"]}',
           f'{"side":10s} {"median s":>9s} {"min s":>7s} {"max s":>7s} {"img/s":>7s} {"cpu s":>7s} {"faults k":>8s} {"params M":>9s}']
  for name, s in r['sides'].items():
    lines.append(f'{name:10s} {s["median_s"]:9.3f} {s["min_s"]:7.3f} {s["max_s"]:7.3f} {s["images_per_s"]:7.2f} '
                 f'{s["cpu_s_median"]:7.2f} {s.get("page_faults_median", 0) / 1e3:8.1f} {s["params"] / 1e6:9.2f}')
  for k, v in r['throughput_ratio'].items():
    turn = r.get('per_turn_ratio', {}).get(k)
    extra = (f'  (per turn: median {turn["median"]:.3f}, {turn["min"]:.3f}-{turn["max"]:.3f} over {turn["turns"]} '
             f'turns)') if turn else ''
    lines.append(f'throughput {k}: {v:.3f}{extra}')
  for k, v in r['skipped'].items():
    lines.append(f'skipped {k}: {v}')
  return '\n'.join(lines)


def main(argv) -> None:
  del argv
  if _POOL.value:
    if not _RESULTS.value or not os.path.exists(_RESULTS.value):
      raise SystemExit(f'--pool reads --results, which is missing: {_RESULTS.value!r}')
    try:
      records, _ = plot_results.read_results(_RESULTS.value)  # Unreadable lines skipped.
      print(format_pool(pool_runs(records, _POOL.value)), flush=True)
    except ValueError as e:
      raise SystemExit(str(e)) from None
    return
  if _DEVICE.value == 'cpu':
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  record = compare(_SIZE.value, _BATCH.value, _ROUNDS.value, _STEPS.value, _WARMUP.value, _PEERS.value,
                   _DEVICE.value, _THREADS.value)
  print(format_record(record), flush=True)
  if _OUT.value:
    common.write_json(_OUT.value, record)
  if _RESULTS.value:
    common.append_result(_RESULTS.value, record)


if __name__ == '__main__':
  app.run(main)
