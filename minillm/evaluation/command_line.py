"""eval.py's arguments, read before Hydra parses them.

Hydra parses the command line before any code of ours runs, and its override grammar rejects many
characters in an unquoted value: ``prompt=Tom, the cat!`` or ``prompt=猫`` end in a
``LexerNoViableAltException``. So eval.py passes its arguments through ``prepare`` first: the
free-text values (``prompt``, ``prompt_file``) are quoted for Hydra, so any text inside one pair of
shell quotes works.
"""

import re
import shlex
from itertools import takewhile
from pathlib import Path

from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

FREE_TEXT = ("prompt", "prompt_file")
_OVERRIDE = re.compile(r"(\+{0,2})([A-Za-z_][\w.]*)=(.*)", re.S)


def hydra_quote(text: str) -> str:
    """``text`` as a quoted Hydra value that composes back to exactly ``text``."""
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)  # OmegaConf: a literal ${
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)       # Hydra: \ before a quote
    return "'" + text.replace("'", "\\'") + "'"


def mode_settings(configs: Path) -> dict[str, set[str]]:
    """The top-level keys each ``configs/mode/NAME.yaml`` sets, with those of the files it includes."""
    def keys(name: str) -> set[str]:
        node = OmegaConf.load(configs / "mode" / f"{name}.yaml")
        included = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        return (set(node) - {"defaults"}).union(*(keys(d) for d in included))

    return {p.stem: keys(p.stem) for p in sorted((configs / "mode").glob("*.yaml"))}


def prepare(args: list[str], configs: Path) -> list[str]:
    """``args`` with every ``prompt=TEXT`` / ``prompt_file=PATH`` quoted for Hydra; raises
    ``OverrideParseException`` for words split off a prompt, an unknown mode, or another mode's setting."""
    settings, entry = mode_settings(configs), OmegaConf.load(configs / "eval.yaml")
    shared = set(entry) - {"defaults", "hydra"}
    matches = [_OVERRIDE.fullmatch(arg) for arg in args]
    chosen = [m.group(3) for m in matches if m and m.group(1, 2) == ("", "mode")]
    default = next(d.mode for d in entry.defaults if OmegaConf.is_dict(d) and "mode" in d)
    mode = chosen[-1] if chosen else default
    if mode not in settings and "," not in mode:  # a comma: a -m sweep over modes, left to Hydra
        raise OverrideParseException(f"mode={mode}",
                                     f"mode={mode!r} is not an evaluation mode; valid: {sorted(settings)}")
    out = list(args)
    for i, match in enumerate(matches):
        if match is None:
            continue
        plus, key, value = match.groups()
        if key in FREE_TEXT:
            _refuse_split_words(args[i], args[i + 1:])
            if not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):  # not yet quoted
                out[i] = f"{plus}{key}={hydra_quote(value)}"
        elif not plus and mode in settings:  # not a -m sweep over modes: another mode's setting?
            top = key.split(".")[0]
            owners = [f"mode={m}" for m, keys in settings.items() if top in keys]
            if owners and top not in shared | settings[mode]:
                raise OverrideParseException(top, (
                    f"{top} is a setting of {', '.join(owners)}, not of mode={mode}; "
                    f"python eval.py mode={mode} --cfg job lists the settings of mode={mode}"))
    return out


def _refuse_split_words(arg: str, rest: list[str]) -> None:
    """``prompt=Tom and 猫`` without shell quotes reaches us as ``prompt=Tom``, ``and``, ``猫``."""
    words = list(takewhile(lambda word: "=" not in word and not word.startswith("-"), rest))
    if words:
        whole = " ".join([arg, *words])
        raise OverrideParseException(whole, (
            f"{arg.split('=')[0]}: the shell passed {' '.join(words)!r} as separate arguments after "
            f"{arg!r}; quote the whole setting for the shell: {shlex.quote(whole)}, or put the text in a "
            "file and pass prompt_file=PATH"))
