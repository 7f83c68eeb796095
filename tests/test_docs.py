"""The README and docs/: every train.py / eval.py command in a code block composes, and no path is
one machine's."""

import re
import shlex

import pytest
from conftest import CONFIGS, ROOT, compose_cfg
from hydra.core.override_parser.overrides_parser import OverridesParser

from minillm.evaluation.command_line import prepare

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT = re.compile(r"(?:^|\s)python (train|eval)\.py(?=\s|$)")


def commands() -> list[tuple[str, str, list[str]]]:
    """(page, script, arguments) of each ``python train.py|eval.py`` line in a page's code blocks."""
    found = []
    for page in PAGES:
        # Fenced blocks: the text between a line opening with ``` and the next such line.
        blocks = re.split(r"^```.*$", page.read_text(), flags=re.M)[1::2]
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                match = SCRIPT.search(line)
                if match:
                    args = shlex.split(line[match.end():], comments=True)
                    found.append((page.name, match.group(1), args))
    return found


def _one_member(args: list[str]) -> list[str]:
    """The overrides of a ``-m`` sweep's first member (Hydra's compose takes no sweep)."""
    parser, out = OverridesParser.create(), []
    for arg in args:
        if arg in ("-m", "--multirun"):
            continue
        override = parser.parse_override(arg)
        if override.is_sweep_override():
            arg = f"{override.get_key_element()}={next(override.sweep_string_iterator())}"
        out.append(arg)
    return out


@pytest.mark.parametrize("page, script, args", commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_documented_commands_compose(page, script, args):
    if script == "eval":
        args = prepare(args, CONFIGS)
    cfg = compose_cfg(_one_member(args), "train" if script == "train" else "eval")
    assert cfg  # composition raises on an unknown option, key or malformed override


def test_documented_commands_were_found():
    scripts = {script for _, script, _ in commands()}
    assert scripts == {"train", "eval"} and len(commands()) >= 15


def test_no_machine_specific_absolute_paths():
    """Paths such as the shared data sample are written relative to the repository, or as DIR."""
    for page in PAGES:
        hits = re.findall(r"(?<![\w.~])/(?:work|home|Users|mnt|scratch|root)/[^\s`)]*", page.read_text())
        assert not hits, f"{page.name}: {hits}"


def test_readme_layout_names_every_folder_and_top_level_module():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    folders = [p for root in ("configs", "minillm") for p in (ROOT / root).iterdir()
               if p.is_dir() and not p.name.startswith(("_", "."))]
    names = [f"{p.name}/" for p in folders] + [p.name for p in (ROOT / "minillm").glob("[!_]*.py")]
    names += ["train.py", "eval.py", "tests/", "bench/", "docs/"]
    assert not [n for n in names if n not in layout], "README Layout misses these"
