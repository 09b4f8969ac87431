"""User-facing errors: the CLI prints their message on one line and exits non-zero, without a traceback."""


class LtbenchError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""

    exit_code = 2


class ConfigError(LtbenchError, ValueError):
    """An invalid configuration value or combination."""


class DataError(LtbenchError):
    """Missing or malformed data files."""


class CheckpointError(LtbenchError):
    """A checkpoint or run directory that cannot be read or resumed."""
