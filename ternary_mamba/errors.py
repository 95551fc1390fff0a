"""One exception type for everything the user can fix.

The CLI turns a `UserError` into a single line on stderr and exit code 1; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input (a path, a file, a flag): the message says what is wrong and what to do."""
