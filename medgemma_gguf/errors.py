"""The one error type users see: a single line naming the problem and the fix."""


class UserError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``error: <message>`` on one line and exits with status 2.
    The message must say what is wrong and how to fix it.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
