"""The README, licence and citation files: what they promise must match the code.

The README's command-line examples are parsed with the real argument parser (so a renamed flag breaks this
test, not a user's copy-paste), the examples must run top to bottom in one folder without two of them
writing the same output, and the sections that docstrings point to must exist.
"""

import re
import shlex
from pathlib import Path

import pytest

from rnnjac.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _rnnjac_commands() -> list[list[str]]:
    """Every `rnnjac ...` line of the README's bash blocks, split as the shell would (comments dropped)."""
    commands = []
    for block in _code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():  # continuation lines joined, as the shell does
            if line.startswith("rnnjac "):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def test_readme_has_an_example_for_every_command():
    used = {argv[0] for argv in _rnnjac_commands()}
    assert used >= {"analyze", "verify", "plot", "info", "demo"}, f"commands without an example: {used}"


@pytest.mark.parametrize("argv", _rnnjac_commands(), ids=lambda argv: " ".join(argv))
def test_readme_commands_parse(argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports unknown or missing options by exiting
        pytest.fail(f"README command 'rnnjac {' '.join(argv)}' is rejected by the CLI (exit {exc.code})")


def _outputs() -> list[tuple[str, bool]]:
    """(output path, written with overwrite) for each README example, in reading order."""
    found = []
    for argv in _rnnjac_commands():
        for flag in ("-o", "--out"):
            if flag in argv:
                found.append((argv[argv.index(flag) + 1], "--overwrite" in argv))
    for block in _code_blocks("python"):
        found += [(m, "overwrite=True" in block) for m in re.findall(r"rnnjac\.save\([^,]+,\s*\"([^\"]+)\"", block)]
    return found


def test_readme_examples_write_distinct_outputs():
    seen = set()
    for path, overwrite in _outputs():
        assert path not in seen or overwrite, f"the README writes {path!r} twice; the second run would fail"
        seen.add(path)
    assert "quickstart.nc" in seen and "rnnjac-demo" in seen


def test_readme_sections_that_docstrings_point_to():
    conventions = README[README.index("## Conventions") :]
    conventions = conventions[: conventions.index("\n## ", 1)]
    for name in ("**State vector.**", "**Structure pays", "### Labelled outputs"):
        assert name in conventions, f"README 'Conventions' lacks {name}"
    for name in ("## Set-up", "## Quick start", "## Command line", "## Data safety", "## How to read the outputs"):
        assert name in README


def test_no_reference_to_a_missing_design_document():
    offenders = [
        str(p.relative_to(ROOT))
        for p in [ROOT / "README.md", *sorted((ROOT / "rnnjac").rglob("*.py"))]
        if "DESIGN.md" in p.read_text(encoding="utf-8")
    ]
    assert not offenders, f"DESIGN.md is not in the repository; point to README 'Conventions' instead: {offenders}"


def test_licence_and_citation_agree_with_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'(?m)^license = "MIT"$', pyproject)
    assert re.search(r'(?m)^license-files = \["LICENSE"\]$', pyproject)
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("MIT License") and "rnnjac developers" in licence
    cff = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    top = dict(re.findall(r"(?m)^([a-z-]+): *(.*)$", cff))  # the top-level keys of the YAML file
    assert top["cff-version"] == "1.2.0" and top["license"] == "MIT" and top["type"] == "software"
    assert {"message", "title", "authors", "version"} <= set(top)
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "rnnjac" / "_version.py").read_text()).group(1)
    assert top["version"].strip('"') == version
