"""The README says what the code does: its Python example runs as written (on the tiny model instead of
the 7B download), and its settings table is `ego.Settings`."""

import dataclasses
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs(monkeypatch, tmp_path, capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'Ego.from_pretrained("qwen2.5-vl-7b")' in code
    code = code.replace('Ego.from_pretrained("qwen2.5-vl-7b")', 'Ego.from_pretrained("tiny-qwen2.5-vl")')
    code = code.replace('"my-concepts.ego"', repr(str(tmp_path / "my-concepts.ego")))
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "Chelsea" in printed and (tmp_path / "my-concepts.ego").exists()


def _table(section: str) -> dict:
    """{setting: default} of a Markdown settings table (numbers as floats, words lower-case)."""
    listed = {}
    for row in re.findall(r"^\| (`.+?) \| (.+?) \|", section, re.M):
        names = re.findall(r"`(\w+)`", row[0])
        values = [value.strip() for value in row[1].split(" / ")]
        assert len(names) == len(values), row
        for name, value in zip(names, values):
            words = value.strip('"')
            listed[name] = words if words != value or words in ("true", "false", "none") else \
                math.prod(float(part.replace(",", "")) for part in value.split("×"))
    return listed


def _defaults(cls) -> dict:
    return {field.name: str(value).lower() if isinstance(value, (bool, str)) or value is None else float(value)
            for field in dataclasses.fields(cls) for value in [getattr(cls(), field.name)]}


def test_the_settings_tables_list_every_setting_with_its_default():
    """The docs mirror `ego.Settings` and `space.settings.SpaceSettings`: each field in its own table, with its
    default value, and no field in both."""
    from ego.settings import Settings
    from space.settings import SpaceSettings

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    engine = readme[readme.index("### Engine settings"):readme.index("### Space settings")]
    space = readme[readme.index("### Space settings"):readme.index("## Limits and privacy")]
    assert _table(engine) == _defaults(Settings)
    assert _table(space) == _defaults(SpaceSettings)
    assert not {f.name for f in dataclasses.fields(Settings)} & {f.name for f in dataclasses.fields(SpaceSettings)}
