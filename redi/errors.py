"""User-facing errors: the CLI prints these as one line, without a stack trace."""


class ReDiError(Exception):
    """A bad input the user can fix: the message names the input and the fix."""


class ConfigError(ReDiError):
    """A configuration that does not match the schema."""
