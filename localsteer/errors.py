"""Errors a user can cause. The CLI turns each into a one-line message and exit status 1."""


class LocalsteerError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ModelError(LocalsteerError):
    """A model file is missing, unreadable, not a GGUF model, or unknown by name."""


class VectorError(LocalsteerError):
    """A control-vector file is malformed or does not fit the model."""


class DatasetError(LocalsteerError):
    """A dataset file is missing, empty or has a malformed line."""


class LayerRangeError(LocalsteerError):
    """A layer range is malformed or outside the model."""


class OutputExistsError(LocalsteerError):
    """An output file exists and overwriting was not asked for."""


class OutputError(LocalsteerError):
    """An output cannot be written there (not a regular file, read-only, disk full)."""


class ContextError(LocalsteerError):
    """A prompt does not fit the context."""


class PullError(LocalsteerError):
    """A known model could not be fetched or failed its checksum."""


class ProbeError(LocalsteerError):
    """A probe file is malformed or does not fit the model."""
