"""The README and docs/ say what the code does: their Python examples run as written (on the tiny model instead
of the 7B download), their settings tables are `ego.Settings` and `SpaceSettings`, and their links lead somewhere."""

import dataclasses
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_python_example(text: str, tmp_path, monkeypatch) -> None:
    """Run the first ```python block of `text` on the tiny Qwen2.5-VL, from the repository root."""
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert 'Ego.from_pretrained("qwen2.5-vl-7b")' in code
    code = code.replace('Ego.from_pretrained("qwen2.5-vl-7b")', 'Ego.from_pretrained("tiny-qwen2.5-vl")')
    code = code.replace('"my-concepts.safetensors"', repr(str(tmp_path / "my-concepts.safetensors")))
    monkeypatch.chdir(ROOT)
    exec(compile(code, "example", "exec"), {})


def test_the_python_api_example_runs(monkeypatch, tmp_path, capsys):
    _run_python_example((ROOT / "docs" / "python-api.md").read_text(encoding="utf-8"), tmp_path, monkeypatch)
    printed = capsys.readouterr().out
    assert "Chelsea" in printed and (tmp_path / "my-concepts.safetensors").exists()


def test_the_readme_tour_example_runs(monkeypatch, tmp_path, capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    _run_python_example(readme[readme.index("## A short tour") :], tmp_path, monkeypatch)
    assert capsys.readouterr().out.strip()  # the answer, printed


def test_every_relative_link_of_the_docs_leads_to_a_file():
    for doc in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which is not there"


def _table(section: str) -> dict:
    """{setting: default} of a Markdown settings table (numbers as floats, words lower-case)."""
    listed = {}
    for row in re.findall(r"^\| (`.+?) \| (.+?) \|", section, re.M):
        names = re.findall(r"`(\w+)`", row[0])
        values = [value.strip() for value in row[1].split(" / ")]
        assert len(names) == len(values), row
        for name, value in zip(names, values):
            words = value.strip('"')
            listed[name] = (
                words
                if words != value or words in ("true", "false", "none")
                else math.prod(float(part.replace(",", "")) for part in value.split("×"))
            )
    return listed


def _defaults(cls) -> dict:
    return {
        field.name: str(value).lower() if isinstance(value, (bool, str)) or value is None else float(value)
        for field in dataclasses.fields(cls)
        for value in [getattr(cls(), field.name)]
    }


def test_the_settings_tables_list_every_setting_with_its_default():
    """docs/privacy-and-limits.md mirrors `ego.Settings` and `space.settings.SpaceSettings`: each field in its own
    table, with its default value, and no field in both."""
    from ego.settings import Settings
    from space.settings import SpaceSettings

    doc = (ROOT / "docs" / "privacy-and-limits.md").read_text(encoding="utf-8")
    engine = doc[doc.index("### Engine settings") : doc.index("### Space settings")]
    space = doc[doc.index("### Space settings") :]
    assert _table(engine) == _defaults(Settings)
    assert _table(space) == _defaults(SpaceSettings)
    assert not {f.name for f in dataclasses.fields(Settings)} & {f.name for f in dataclasses.fields(SpaceSettings)}


def test_the_conversations_doc_example_runs(monkeypatch, capsys):
    doc = (ROOT / "docs" / "conversations.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert 'Ego.from_pretrained("qwen2.5-vl-7b")' in code
    code = code.replace('Ego.from_pretrained("qwen2.5-vl-7b")', 'Ego.from_pretrained("tiny-qwen2.5-vl")')
    code = code.replace("chat.ask(", "chat.ask(max_new_tokens=4, question=").replace(
        "chat.stream(", "chat.stream(max_new_tokens=4, question="
    )
    monkeypatch.chdir(ROOT)
    scope = {}
    exec(compile(code, "conversations.md", "exec"), scope)
    first, again = scope["first"], scope["again"]
    assert first.prefill_tokens == first.context_tokens
    assert 0 < again.prefill_tokens < again.context_tokens - first.context_tokens + 2
    asked = "['Is Chelsea in this photo?', 'What is she doing?', 'And the colour of the wall?']"
    assert asked in capsys.readouterr().out
