"""Typed errors shared by every part; only ``main()`` turns them into a message and exit code.

Exit codes (DESIGN.md, "Command line"): 0 done; 2 usage or configuration error; 3 input
rejected; 4 a needed service or model is unavailable.
"""

from __future__ import annotations


class OsteofyError(Exception):
    """Base of every error the command line reports as one line."""

    exit_code = 1


class UsageError(OsteofyError):
    """Bad arguments or configuration."""

    exit_code = 2


class InputRejected(OsteofyError):
    """An input file is not something we can screen (corrupt, unsupported, out of distribution)."""

    exit_code = 3


class Unavailable(OsteofyError):
    """A needed service, model or optional dependency is missing."""

    exit_code = 4
