"""User-facing errors: the CLI prints their message (one line per problem), never a stack trace."""


class ReDiError(Exception):
    """A bad input the user can fix: the message names the input and the fix."""


class ConfigError(ReDiError):
    """A configuration that does not match the schema."""


class WriteFailure(ReDiError):
    """A write that failed inside HDF5 (a full disk, a folder gone read-only).

    HDF5 cannot close a file after a failed write without crashing the process, so the CLI exits
    right after printing the message, without the library's cleanup; the `.partial` file stays.
    """
