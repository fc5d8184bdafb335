"""The errors jmm raises for bad input: a leaf module every layer may import (it imports nothing of jmm).

Each is a user error with a message naming the field, file or device count at fault; `jmm.main` and
`jmm.evaluate` print it as one `error: ...` line instead of a traceback.
"""


class ConfigError(ValueError):
  """A config value is missing, unknown or out of range; the message names the field."""


class MeshError(ValueError):
  """The mesh in the config does not fit the devices, or the batch does not fit the mesh."""


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir was written by a model of another shape."""


class WorkdirError(OSError):
  """The workdir cannot be created or written."""


class NonFiniteError(FloatingPointError):
  """Training stopped after too many consecutive steps with a non-finite loss or gradient norm."""


USER_ERRORS = (ConfigError, MeshError, CheckpointMismatchError, WorkdirError, NonFiniteError, FileNotFoundError)
