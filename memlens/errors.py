"""Errors a user can fix. The CLI turns each into a one-line message and exit code 2."""

from __future__ import annotations


class MemlensError(Exception):
    """Bad input: a wrong name, a malformed file, a mismatch between artefacts.

    The message is a single line that names the problem and, where it helps, the fix.
    """
