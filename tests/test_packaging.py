"""pyproject.toml says what the requirements files say: they are the source of truth (the README and CI install
from them), and the package metadata must not drift from them."""

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def requirements(name: str) -> list[str]:
    """The requirement specifiers of one file, comments, blank lines and `-r` includes left out."""
    lines = (re.sub(r"#.*", "", line).strip() for line in (ROOT / name).read_text(encoding="utf-8").splitlines())
    return [re.sub(r"\s+", "", line) for line in lines if line and not line.startswith("-r")]


@pytest.mark.parametrize(
    "listed, name",
    [
        (PROJECT["dependencies"], "requirements.txt"),
        (PROJECT["optional-dependencies"]["dev"], "requirements-dev.txt"),
        (PROJECT["optional-dependencies"]["examples"], "requirements-examples.txt"),
    ],
)
def test_pyproject_lists_the_requirements_files(listed, name):
    assert [re.sub(r"\s+", "", item) for item in listed] == requirements(name)


def test_the_dev_file_builds_on_the_runtime_file():
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text(encoding="utf-8").splitlines()


def test_the_python_version_is_the_spaces():
    card = (ROOT / "README.md").read_text(encoding="utf-8")
    version = re.search(r'^python_version: "(\d+\.\d+)"', card, re.M).group(1)
    assert PROJECT["requires-python"].startswith(f">={version},")
