"""The one exception type users see: the CLI prints its message as a single line and exits non-zero."""


class ReqError(Exception):
    """A problem with the user's input (model, data, file, option), not a bug in repq-tvm."""
