"""Command-line error handling shared by train.py and eval.py."""

import sys
from contextlib import contextmanager
from typing import Iterator

from hydra.errors import InstantiationException

from minillm.data import DataUnavailableError


@contextmanager
def config_errors() -> Iterator[None]:
    """Turn a configuration ``ValueError`` (also one wrapped by Hydra's instantiate) or unavailable
    data into one line on stderr and exit code 2, instead of a traceback."""
    try:
        yield
    except (ValueError, InstantiationException, DataUnavailableError) as e:
        cause: BaseException = e
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
