"""Errors a user should see as one clear line (the CLI prints them and exits non-zero, no traceback)."""


class InputError(Exception):
    """Bad input: a file, folder or value that cannot be used; the message names it and says why."""
