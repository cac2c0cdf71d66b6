"""The one error type of the data loaders."""


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the problem."""
