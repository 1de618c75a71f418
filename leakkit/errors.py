"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class LeakkitError(Exception):
    """A mistake in what the user asked for, or an attack outcome the user must hear about."""

    exit_code = 2


class ConfigError(LeakkitError):
    """Unknown recipe, key or name; a value of the wrong type."""


class InputError(LeakkitError):
    """A missing or unreadable input file, or data that does not fit the task."""


class ObservationMismatch(LeakkitError):
    """An observed update whose parameter names or shapes do not fit the model."""


class AttackDiverged(LeakkitError):
    """Every restart of an attack ended in NaN or infinity."""

    exit_code = 3


class Interrupted(LeakkitError):
    """The user stopped a run or an audit; what was finished has been saved."""

    exit_code = 130


def few(items: list[str], n: int = 3) -> str:
    """The first `n` items of a list for a one-line message, with how many more there are."""
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
