"""Errors raised for bad user input."""


class TokenSparseError(ValueError):
    """Bad input to tokensparse: the message names the bad value and what is allowed.

    The CLI turns it into a one-line message and exit code 2, never a traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its class name when empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
