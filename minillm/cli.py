"""Command-line error handling shared by train.py and eval.py."""

import sys
from contextlib import contextmanager
from typing import Iterator

from hydra.errors import InstantiationException


@contextmanager
def config_errors() -> Iterator[None]:
    """Turn a configuration ``ValueError`` (also one wrapped by Hydra) into one line and exit code 2."""
    try:
        yield
    except (ValueError, InstantiationException) as e:
        cause: BaseException = e
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if not isinstance(cause, ValueError) and not isinstance(e, InstantiationException):
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
