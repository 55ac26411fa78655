"""Errors shown to users as one clear line (file, field or line named), never a traceback."""


class UserError(Exception):
    """A problem with the user's input or files that the user can fix."""


def one_line(err: BaseException) -> str:
    """The user's message of `err`. A UserError raised in a DataLoader worker comes back wrapped in
    the worker's traceback; only its own last line is the message."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split("UserError: ", 1)[-1]
    return text
