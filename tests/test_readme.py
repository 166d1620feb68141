"""The README's Python examples run as written on CPU (the front door must stay true)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_examples():
    assert BLOCKS, "README.md lost its Python examples"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, tmp_path, monkeypatch):
    """As a newcomer runs it on a CPU: the PyTorch paths, not the Triton interpreter that conftest.py
    switches on for the kernel tests (dept_fast decides per call, so unsetting it here is enough)."""
    monkeypatch.chdir(tmp_path)  # examples that save checkpoints write into a scratch folder
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
