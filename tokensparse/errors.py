"""Errors raised for bad user input."""


class TokenSparseError(ValueError):
    """Bad input to tokensparse: the message names the bad value and what is allowed.

    The CLI turns it into a one-line message and exit code 2, never a traceback.
    """
