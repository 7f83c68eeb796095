"""Reading a composed config: Hydra's ``instantiate`` with the constructor's own error, and the one
integer check every group's constructor uses (``is_int``, ``check_int``).

The bottom of the package (it imports only Hydra and OmegaConf): model, data, training, evaluation
and the command line all read settings through it, so a bad value is reported the same way
everywhere: the config key, its value and what would be valid.
"""

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate


def root_cause(error: BaseException) -> BaseException:
    """The error a constructor raised, out of Hydra's nested ``InstantiationException`` wrappers
    (whose messages bury the one line that names the setting)."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def instantiate_checked(node: Any, **kwargs: Any) -> Any:
    """Hydra's ``instantiate``, with a constructor's ValueError re-raised as itself."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = root_cause(e)
        if isinstance(cause, ValueError):
            raise ValueError(str(cause)) from None
        raise


def is_int(value: Any, minimum: int = 1, maximum: int | None = None) -> bool:
    """Whether ``value`` is an int (a bool is not, though Python says so) in [minimum, maximum]."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum and \
        (maximum is None or value <= maximum)


def check_int(value: Any, key: str, minimum: int = 1, maximum: int | None = None, hint: str = "") -> None:
    """Raise ValueError naming ``key`` unless ``is_int(value, minimum, maximum)``."""
    if not is_int(value, minimum, maximum):
        valid = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ValueError(f"{key}={value!r} must be an integer {valid}{hint}")
