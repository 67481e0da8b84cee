"""The error a user can fix: CLIs print its message and exit 2; anything else keeps its traceback.

`UserError` subclasses ValueError, so code that guarded against a bad value before keeps working; raise
it (or a subclass) only for inputs a user controls — config values, data and manifests, run directories
and checkpoints on disk, command-line flags — with a message that says what to fix. A bug deep in a
training run (a shape mismatch at step 50k) must stay a plain exception and keep its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """A bad input the message explains (config, data, files on disk, flags); CLIs exit 2 with it."""


class ConfigError(UserError):
    """A config value that cannot work; the message names the key and says what to fix."""


class MissingInput(UserError, FileNotFoundError):
    """A file or directory the user named, or that a run needs, is not there; the message says what to run or set."""
