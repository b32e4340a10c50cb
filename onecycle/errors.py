"""Errors a user can act on. The stage runner (`cli.run`) catches :class:`UserError` alone and
prints its message without a traceback; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Something the user can fix: the message names the file or key and what to do."""


class DataError(UserError):
    """The data source or data/prepared is missing, corrupt or not in a layout we read."""


class MissingInput(UserError, FileNotFoundError):
    """A file an earlier stage writes is not there (run that stage first)."""


class WriteError(UserError):
    """An output could not be written (no space, read-only, no permission); the previous file
    at that path is unchanged."""
