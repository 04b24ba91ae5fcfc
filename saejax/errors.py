"""The project's own exceptions: every error a user can cause names what is wrong and where."""


class SaejaxError(Exception):
  """Base class of every error saejax raises on purpose."""


class ConfigError(SaejaxError, ValueError):
  """A model or training config is invalid or unsupported."""


class CheckpointError(SaejaxError, ValueError):
  """A weight file or checkpoint is missing, incomplete, or does not fit the model."""


class DataError(SaejaxError, ValueError):
  """A data record or data source is malformed."""


class ShapeError(SaejaxError, ValueError):
  """Arrays handed to an SAE function or a loss have shapes that do not fit together."""
