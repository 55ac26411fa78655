"""Errors shown to users as one clear line (file, field or line named), never a traceback."""


class UserError(Exception):
    """A problem with the user's input or files that the user can fix."""
