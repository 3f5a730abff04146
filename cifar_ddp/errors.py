"""The one exception type that means "the user asked for something we cannot do".

Launchers catch it and print its message alone (no traceback), then exit with
status 2. Anything else escaping is a bug in cifar_ddp and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's config, data, checkpoint or command line."""


class ConfigError(UserError):
    """A config key is unknown, mistyped or holds an impossible value."""


def one_line(exc: BaseException) -> str:
    """`TypeName: first line of the message`, for errors raised by a user's own code."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
