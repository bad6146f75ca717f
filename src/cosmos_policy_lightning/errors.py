"""Errors that reach the user as one line (the CLI prints them without a traceback)."""


class CosmosPolicyError(ValueError):
    """Base class: bad input or configuration. The message is one line naming the file, key and
    what was expected."""


class DataError(CosmosPolicyError):
    """Malformed or inconsistent dataset input (source files, shards, statistics)."""


#: errno values of OSErrors that are the user's environment, not a bug: permissions, read-only or full
#: file systems, a file where a directory is expected (and vice versa), symlink loops, file too large.
USER_OS_ERRNOS = frozenset({1, 2, 13, 17, 20, 21, 27, 28, 30, 36, 40, 122})  # EPERM ENOENT EACCES EEXIST
# ENOTDIR EISDIR EFBIG ENOSPC EROFS ENAMETOOLONG ELOOP EDQUOT


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def os_error_line(err: OSError) -> str:
    """``<file>: <reason>`` for an OSError (``[Errno 28] No space left on device: 'x'`` -> ``x: no space
    left on device (errno 28)``)."""
    name = err.filename if err.filename is not None else ""
    reason = (err.strerror or str(err)).strip().splitlines()[0] if (err.strerror or str(err)) else type(err).__name__
    reason = reason[:1].lower() + reason[1:]
    where = f"{name}: " if name else ""
    return f"{where}{reason}" + (f" (errno {err.errno})" if err.errno else "")


def _chain(err: BaseException):
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _last_line(message: str) -> str:
    """A message re-raised from a data-loader worker (``Caught DataError in DataLoader worker process 0.
    Original Traceback ...``) keeps the original one-line message on its last line, after the type."""
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return message.strip()
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and "." in head and " " not in head else last


def user_message(err: BaseException) -> str | None:
    """The one-line message for the user hidden in ``err`` or its cause / context chain, or None when
    the chain holds no user error (then it is a bug and deserves its traceback).

    LightningCLI / jsonargparse wrap errors raised while instantiating the data module or the model
    (``ValueError: Call to compute_fn of link ... failed``, ``Does not validate against any of the Union
    subtypes``), and PyTorch re-raises data-loader worker errors with the worker's traceback in the
    message; the first :class:`CosmosPolicyError` in the chain is what the user needs. OSErrors of the
    environment (:data:`USER_OS_ERRNOS`: permission denied, read-only or full disk, symlink loop, ...)
    become ``<file>: <reason>``.
    """
    chain = list(_chain(err))
    for e in chain:
        if isinstance(e, CosmosPolicyError):
            return _last_line(str(e))
    for e in chain:
        if isinstance(e, OSError) and e.errno in USER_OS_ERRNOS:
            return os_error_line(e)
    for e in chain:
        if isinstance(e, FileNotFoundError):
            return _last_line(str(e))
    return None
