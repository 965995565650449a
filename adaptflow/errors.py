"""The one error type users see: a bad spec or bad data, with what to do about it."""


class StudyError(ValueError):
    """Raised before any training starts, with a message that names the problem and the fix."""
