"""Errors shown to users as one clear line (file, field or line named), never a traceback."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or files that the user can fix."""


def one_line(err: BaseException) -> str:
    """The user's message of `err`. A UserError raised in a DataLoader worker comes back wrapped in
    the worker's traceback; only its own last line is the message."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split("UserError: ", 1)[-1]
    return text


@contextmanager
def writing(path: str | os.PathLike, what: str = "output") -> Iterator[None]:
    """Turn the file-system errors of writing `path` into one line that says what to do."""
    try:
        yield
    except (FileExistsError, NotADirectoryError) as err:
        where = Path(err.filename or path)
        blocking = next((p for p in (where, *where.parents) if p.is_file()), where)
        raise UserError(
            f"{what} {path}: {blocking} is a file where a folder is needed; choose another path"
        ) from None
    except IsADirectoryError as err:
        raise UserError(f"{what} {path}: {err.filename} is a folder where a file is needed") from None
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(
                f"{what} {path}: not writable ({err.strerror}); choose a folder you can write to"
            ) from None
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"{what} {path}: no space left on the device ({err.strerror}); what was finished is kept: "
                "free space and run the same command again"
            ) from None
        raise
