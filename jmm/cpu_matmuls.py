"""Which library runs XLA:CPU's matrix multiplications: oneDNN for the training step, with a safety check.

Why. XLA:CPU hands each dot to YNNPACK by default. On the projection and MLP shapes of a ViT-S/16 SigLIP step
([3136, 384] x [384, 384] ... [3136, 1536] x [1536, 384], fp32) oneDNN's kernels are faster: one S/16
encoder block's forward + backward (batch 16, 196 tokens) 274 ms against 327 ms (medians of 25-30 alternating
calls on a 2-core AMD EPYC VM); the whole S/16 + S/16 training step at batch 16 5.28 s against 5.40 s (medians
of 12 alternating steps; the VM's noise is +-5%) and 9.75 against 10.37 CPU-seconds a step. XLA ships oneDNN
'fusions' behind experimental options: `xla_cpu_use_onednn`,
`xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT`, and YNNPACK's fusions narrowed to reductions
so that the dots reach oneDNN (`xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE`). Keeping
YNNPACK's reductions matters: with YNNPACK off entirely, XLA rewrites every large reduction (bias gradients,
softmax and LayerNorm statistics) into a slow generic reduce-window loop; a bias gradient plus a softmax on ViT-S/16
shapes took 16 ms that way against 3 ms through YNNPACK, and one S/16 block's forward + backward 261 ms against
241 ms (medians of 15 alternating calls, 2-core Xeon VM). YNNPACK then also takes attention's q k^T dot into its
softmax fusion.

The catch: the feature is experimental (XLA in jaxlib 0.10.2). Some fusions that XLA builds for oneDNN fail in
oneDNN when first run, and the process dies ("partition compile failed", no Python exception): a fusion of two
dots (x @ a + y @ b, which autodiff makes of the input gradient of separate q/k/v projections) and one with an
element-wise op before the dot ((a + b) @ c). Worse, a batched dot with a scalar multiply fused after it
(attention's logits * scale) runs and returns wrong numbers. What ran correctly in every case tried: a fusion of
one dot on parameters, and an un-batched dot plus one added array (a bias). So `checked_jit` compiles the step,
reads the optimised HLO, and accepts oneDNN only when every oneDNN fusion has one of those shapes; otherwise it
logs the refused fusions and recompiles without oneDNN (XLA's default libraries). jmm's own layers keep their
dots alone (stacked q/k/v projections, attention's scale applied after the row max), so its steps pass.
Compiling once through `.lower().compile()` fills the jit cache, so the accepted step is not compiled again on
its first call.

`config.cpu_matmuls`:
  'auto'    (default) oneDNN when the default backend is CPU on x86-64; nothing changes on GPU / TPU;
  'onednn'  oneDNN whenever the default backend is CPU;
  'xla'     XLA's own choice (YNNPACK, Eigen).
"""
from __future__ import annotations

import logging
import platform
import re
from typing import Any, Callable

import jax

from jmm.kernels.matmul import row_contraction  # noqa: F401  (re-exported; defined below the kernels)

MODES = ('auto', 'onednn', 'xla')

ONEDNN_OPTIONS = {
    'xla_cpu_use_onednn': True,
    'xla_cpu_experimental_onednn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT',
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE',  # Not its dots (else YNNPACK claims them).
}


def compiler_options(mode: str, backend: str | None = None) -> dict[str, Any]:
  """XLA compiler options for `mode` (a key of MODES) on `backend` (default: jax.default_backend())."""
  if mode not in MODES:
    raise ValueError(f'cpu_matmuls={mode!r}; expected one of {MODES}')
  backend = backend or jax.default_backend()
  if backend != 'cpu' or mode == 'xla':
    return {}
  if mode == 'auto' and platform.machine().lower() not in ('x86_64', 'amd64'):
    return {}
  return dict(ONEDNN_OPTIONS)


_COMPUTATION = re.compile(r'^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}', re.S | re.M)
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(([^)]*)\)', re.M)
_ONEDNN_FUSION = re.compile(r'calls=%?([\w.\-]+)[^\n]*"kind":"__onednn_fusion"')


def computation_bodies(hlo_text: str) -> dict[str, str]:
  """{computation name: its body's text} for HLO text (the fused computations a fusion `calls=`)."""
  return {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}


_SAFE_FUSIONS = (
    ['dot', 'parameter', 'parameter'],
    ['dot', 'parameter'],  # x @ x.
)


def unsupported_fusions(hlo_text: str) -> list[str]:
  """Names of the oneDNN fusions in optimised HLO text that are not of a shape known to run correctly: one dot of
  parameters, or one un-batched dot plus one added parameter (a bias). Others may fail to compile or compute
  wrongly at run time. Empty: every oneDNN fusion is safe."""
  bodies = computation_bodies(hlo_text)
  bad = []
  for name in sorted(set(_ONEDNN_FUSION.findall(hlo_text))):
    body = bodies.get(name, '')
    kinds = sorted(op for _, op, _ in _INSTRUCTION.findall(body))
    plus_bias = kinds == ['add', 'dot', 'parameter', 'parameter', 'parameter'] and 'batch_dims' not in body
    if kinds not in _SAFE_FUSIONS and not plus_bias:
      bad.append(name)
  return bad


def checked_jit(make: Callable[[dict | None], Any], options: dict, *example_args) -> tuple[Any, bool]:
  """(jitted function, whether it uses `options`). make(compiler_options) -> a jitted function.

  With oneDNN `options`, compiles make(options) for `example_args` and returns it when every oneDNN fusion is
  safe (`unsupported_fusions`), else make(None) (and a warning naming the refused fusions). Without options:
  make(None), nothing compiled here."""
  if not options:
    return make(None), False
  fn = make(options)
  try:
    hlo = fn.lower(*example_args).compile().as_text()
  except Exception as e:  # pylint: disable=broad-except  (an XLA build without oneDNN, say)
    logging.warning('cpu_matmuls: compiling with oneDNN failed (%s); using XLA\'s default matmuls', e)
    return make(None), False
  bad = unsupported_fusions(hlo)
  if bad:
    logging.warning('cpu_matmuls: %d oneDNN fusion(s) of a shape oneDNN may not run (%s); using XLA\'s default '
                    'matmuls for this program', len(bad), ', '.join(bad[:5]))
    return make(None), False
  return fn, True
