"""Errors as the one line charlm shows (no framework imports: the adapters share it)."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of the error's message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# What is wrong with a path, by errno; the errno's own text follows in parentheses.
_WHAT = {
    "ENOENT": "does not exist",
    "EEXIST": "already exists",
    "EACCES": "not permitted",
    "EPERM": "not permitted",
    "ENOTDIR": "a part of the path is a file, not a folder",
    "EISDIR": "is a folder, not a file",
    "ENOTEMPTY": "folder is not empty",
    "ENOSPC": "no space left on its device",
    "EDQUOT": "disk quota exceeded",
    "EROFS": "on a read-only file system",
    "ENAMETOOLONG": "name too long",
    "ELOOP": "too many symbolic links",
}


def os_error_line(e: OSError) -> str | None:
    """`<path>: <what is wrong> (<errno text>)` for an OS error that names a path, else None
    (the caller keeps the error's own first line)."""
    import errno as errno_mod

    if not e.filename or e.errno is None:
        return None
    name = errno_mod.errorcode.get(e.errno, "")
    what = _WHAT.get(name, "cannot be used")
    target = f" -> {e.filename2}" if e.filename2 else ""
    return f"{e.filename}{target}: {what} ({e.strerror or name})"
