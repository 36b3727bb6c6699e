"""The README's Python example runs as written (on the tiny model instead of the 7B download)."""

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
