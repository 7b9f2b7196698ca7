"""Errors the CLI turns into one-line messages instead of tracebacks."""


class CgnnError(Exception):
    """A problem the user can fix (bad input, stale cache, unreachable database). CLI exit code 1."""


class UsageError(CgnnError):
    """A bad command line or configuration (unknown key, wrong type, missing file). CLI exit code 2."""
