"""The one exception type users see: the CLI prints its message as a single line and exits non-zero."""

import json


class ReqError(Exception):
    """A problem with the user's input (model, data, file, option), not a bug in repq-tvm."""


def read_json(path: str, what: str) -> dict:
    """A JSON file the user handed us (a manifest, a target preset); unreadable or invalid is a ReqError."""
    try:
        with open(path) as f:
            return json.load(f)
    except IsADirectoryError:
        raise ReqError(f"{what} {path} is a folder, expected a JSON file") from None
    except OSError as exc:
        raise ReqError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # random bytes fail as text before they fail as JSON
        raise ReqError(f"{what} {path} is not valid JSON: {exc}") from None
