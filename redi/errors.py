"""User-facing errors: the CLI prints their message (one line per problem), never a stack trace."""


class ReDiError(Exception):
    """A bad input the user can fix: the message names the input and the fix."""


class ConfigError(ReDiError):
    """A configuration that does not match the schema."""
