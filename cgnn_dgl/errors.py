"""Errors the CLI turns into one-line messages instead of tracebacks."""


class CgnnError(Exception):
    """A problem the user can fix (bad input, stale cache, unreachable database). CLI exit code 1."""


class UsageError(CgnnError):
    """A bad command line or configuration (unknown key, wrong type, missing file). CLI exit code 2."""


def positive_int(text: str) -> int:
    """argparse type for counts (``--limit``, ``--workers``, ``--shard-size``): a one-line error, exit 2,
    for 0, negatives and non-numbers instead of a silent empty run."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value
