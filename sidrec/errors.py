"""User-facing errors: each carries one line naming the file/field and what to fix.

The CLI prints `error: <message>` and exits with code 2 for any SidrecError.
"""


class SidrecError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class ConfigError(SidrecError):
    """A run config or CLI option is invalid."""


class IndexCapacityError(ConfigError, ValueError):
    """The index's codes cannot give every item a unique SID under the configured collision rule."""


class DataError(SidrecError):
    """An input data file is missing, malformed or fails a check."""


class ValidationFailed(DataError):
    """Critical data-quality expectations failed."""


class ModelError(SidrecError):
    """A backbone or trained model cannot be loaded."""
