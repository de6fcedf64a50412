"""One exception type for bad input: the CLI prints its message on one line and exits non-zero."""


class DigitError(Exception):
    """A user-facing error (bad path, mismatched pieces, invalid option). Its message is the whole story."""
