"""Errors the command line reports as one line (exit code 2) instead of a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A problem with the user's configuration or input that the message explains how to fix.

    Subclassing ValueError keeps ``except ValueError`` callers and tests working.
    """
