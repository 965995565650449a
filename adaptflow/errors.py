"""The one error type users see: a bad spec or bad data, with what to do about it."""

from adaptflow.redact import redact


class StudyError(ValueError):
    """Raised before any training starts, with a message that names the problem and the fix.

    The message is redacted: it reaches the terminal, Prefect's logs and its database.
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))
