"""Errors a user should see as one clear line (the CLI prints them and exits non-zero, no traceback)."""


class InputError(Exception):
    """Bad input: a file, folder or value that cannot be used; the message names it and says why."""


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the key, value and what is allowed
    (the CLI exits with code 2)."""
