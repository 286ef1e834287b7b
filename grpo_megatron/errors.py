"""The base of every error that means "the run's inputs need fixing" (config, data, model, layout, versions).

The entry point catches UserError and prints its message as one line (exit 2) instead of a traceback from
every rank, so each subclass's message must name the fix. Lowest layer: imports nothing from the project.
"""
from __future__ import annotations


class UserError(Exception):
    """An input the user must fix; the message names the fix."""


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the key and the fix."""
