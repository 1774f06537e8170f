"""The errors of a served teacher: unreachable, refused, or answering something unusable.

Setting refusals (K above the server's ``--max-logprobs``, a tokenizer that differs from the
local one) are plain ``ValueError``: the caller must change a setting, and retrying is useless.
"""

from __future__ import annotations


class TeacherError(RuntimeError):
    """Base of every served-teacher failure."""


class TeacherUnavailable(TeacherError):
    """The server could not be reached or kept failing (connection refused or reset, timeout,
    5xx) through every retry. The message names the URL, the attempts and the last status or
    exception."""


class TeacherResponseError(TeacherError, ValueError):
    """A response body that cannot be used: undecodable or truncated (after the retries), or
    failing validation (the message names the URL, the row/position and the field)."""


class TeacherRequestError(TeacherError):
    """The server refused the request with a 4xx status (not retried: the same request would
    be refused again). ``status`` and ``message`` hold what the server said."""

    def __init__(self, message: str, *, url: str, status: int, server_message: str) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.server_message = server_message
