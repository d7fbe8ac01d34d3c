"""User-facing errors: one clear line, raised before any compute where possible."""


class RsirError(Exception):
    """An error caused by input (config, data, paths) that the user can fix.

    The CLI prints its message as one line and exits with status 2; anything else
    is a bug and keeps its traceback.
    """
