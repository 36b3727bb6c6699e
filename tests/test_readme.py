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


def test_the_settings_table_lists_every_setting_with_its_default():
    """The README mirrors `ego.Settings`: every field is in the table, with its default value."""
    from ego.settings import Settings

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Settings and limits"):readme.index("## Limits and privacy")]
    listed = {}
    for row in re.findall(r"^\| (`.+?) \| (.+?) \|", section, re.M):
        names = re.findall(r"`(\w+)`", row[0])
        values = [value.strip() for value in row[1].split(" / ")]
        assert len(names) == len(values), row
        for name, value in zip(names, values):
            words = value.strip('"')
            listed[name] = words if words != value or words in ("true", "false", "none") else \
                math.prod(float(part.replace(",", "")) for part in value.split("×"))
    defaults = {field.name: getattr(Settings(), field.name) for field in dataclasses.fields(Settings)}
    assert sorted(listed) == sorted(defaults)
    assert {name: str(value).lower() if isinstance(value, (bool, str)) or value is None else float(value)
            for name, value in defaults.items()} == listed


def test_the_conversations_doc_example_runs(monkeypatch, capsys):
    doc = (ROOT / "docs" / "conversations.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert 'Ego.from_pretrained("qwen2.5-vl-7b")' in code
    code = code.replace('Ego.from_pretrained("qwen2.5-vl-7b")', 'Ego.from_pretrained("tiny-qwen2.5-vl")')
    code = code.replace("chat.ask(", "chat.ask(max_new_tokens=4, question=").replace(
        "chat.stream(", "chat.stream(max_new_tokens=4, question=")
    monkeypatch.chdir(ROOT)
    scope = {}
    exec(compile(code, "conversations.md", "exec"), scope)
    first, again = scope["first"], scope["again"]
    assert first.prefill_tokens == first.context_tokens
    assert 0 < again.prefill_tokens < again.context_tokens - first.context_tokens + 2
    asked = "['Is Chelsea in this photo?', 'What is she doing?', 'And the colour of the wall?']"
    assert asked in capsys.readouterr().out
