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


def test_the_space_card_is_within_the_hubs_limits():
    """The Hub refuses a whole card whose short description is over 60 characters (the Space would not build)."""
    card = (ROOT / "README.md").read_text(encoding="utf-8")
    short = re.search(r"^short_description: (.*)$", card, re.M).group(1).strip()
    title = re.search(r"^title: (.*)$", card, re.M).group(1).strip()
    assert 0 < len(short) <= 60 and 0 < len(title) <= 100


def test_every_package_of_ego_is_installed_with_it():
    """`pip install .` ships every subpackage the code imports (the tiny models, the evaluation), none left out."""
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = set(find_packages(str(ROOT), include=config["packages"]["find"]["include"]))
    on_disk = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "ego").rglob("__init__.py")}
    assert on_disk == found and {"ego.random_models", "ego.evaluate", "ego.backends"} <= found
    # The data files the code reads ship with it too (ego.evaluate reads the paper's numbers when imported).
    data = config["package-data"]
    for path in (ROOT / "ego").rglob("*"):
        if path.is_file() and path.suffix not in (".py", ".pyc"):
            package = str(path.parent.relative_to(ROOT)).replace("/", ".")
            assert any(path.match(pattern) for pattern in data.get(package, [])), path


def test_the_space_package_says_what_each_of_its_modules_is():
    """space/__init__.py is the map of the Space's modules: a module it does not name is one a reader cannot find."""
    import space

    modules = {path.stem for path in (ROOT / "space").glob("*.py") if path.stem != "__init__"}
    named = set(re.findall(r"`space\.(\w+)`", space.__doc__))
    assert modules == named
