"""The one way out for user mistakes: a message that says what, where, and what to do."""


class UserError(Exception):
    """A mistake the user can fix. The CLI prints it as one line and exits non-zero.

    Anything else that escapes is a bug in okome-image and keeps its traceback.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
