"""Command-line error handling shared by train.py and eval.py: one line on stderr, not a traceback.

``config_errors`` wraps the body of a Hydra main function (configuration ``ValueError``s, unavailable
data, a run stopped by a non-finite loss); ``composition_errors`` wraps the call of the Hydra main
function itself, for errors Hydra raises while composing the config (an unknown preset or
component, an override of a key that does not exist, a malformed override).
"""

import os
import sys
from contextlib import contextmanager
from typing import Iterator
from unittest import mock

from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException, \
    OverrideParseException

from minillm.config import root_cause
from minillm.data import DataUnavailableError


@contextmanager
def config_errors() -> Iterator[None]:
    """Turn a configuration ``ValueError`` (also one wrapped by Hydra's instantiate), unavailable
    data or a non-finite loss into one line on stderr and exit code 2 (1 for a stopped run)."""
    from minillm.training.module import NonFiniteError

    try:
        yield
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        _exit_unless_multirun(1, e)
    except (ValueError, InstantiationException, DataUnavailableError) as e:
        print(f"error: {_one_line(str(root_cause(e)))}", file=sys.stderr)
        _exit_unless_multirun(2, e)


def _exit_unless_multirun(code: int, error: Exception) -> None:
    """Exit with ``code``; inside a Hydra multirun re-raise instead, so that Hydra records this job
    as failed (its status file says why) and the sweep's other jobs still run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise error
    raise SystemExit(code) from None


@contextmanager
def composition_errors() -> Iterator[None]:
    """Report a Hydra composition error as one line and exit code 2, e.g.
    ``error: model=nope: no such option; valid: alibi, gpt2, llama, ...``."""
    try:  # HYDRA_FULL_ERROR: Hydra re-raises instead of printing a multi-line report
        with mock.patch.dict(os.environ, HYDRA_FULL_ERROR="1"):
            yield
    except (ConfigCompositionException, OverrideParseException) as e:
        print(f"error: {composition_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def composition_message(e: Exception) -> str:
    """One line for a Hydra composition error; for a missing option, the group's valid options."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, name = e.missing_cfg_file.rpartition("/")
        valid = sorted(o for o in e.options if not o.startswith("_"))  # _base.yaml: not an option
        return f"{group}={name}: no such option; valid: {', '.join(valid)}"
    text = str(e)
    if e.__cause__ is not None and str(e.__cause__) not in text:
        text += f" ({e.__cause__})"
    return _one_line(text)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())
