"""The runner's exception family: each message names the item and says what to do."""


class RunnerError(Exception):
    """Base class; `exit_code` is what the CLI returns for it."""

    exit_code = 1


class InputError(RunnerError):
    """Bad input or usage, detected before any transcription starts (CLI exit 2)."""

    exit_code = 2


class UnsupportedModelError(InputError):
    """The .nemo file holds a model family the runner cannot rebuild."""


class ManifestError(InputError):
    """A manifest line is malformed; the message starts with `file:line:`."""


class AudioLoadError(RunnerError):
    """One audio item cannot be read; it becomes an error row, not a crash."""


class QuantizationError(RunnerError):
    """Quantization failed or int8 accuracy is outside the tolerance."""
