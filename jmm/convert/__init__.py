"""Import and export of peer checkpoints (HF transformers, open_clip, big_vision) and initial parameters."""


def load_init_params(path: str, params):
  """Returns parameters loaded from `path` (a jmm workdir or a converted params file), shaped like `params`."""
  raise NotImplementedError(f'config.init_from={path!r}: loading initial parameters is not implemented yet')
