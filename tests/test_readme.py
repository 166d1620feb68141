"""Every code block of README.md and docs/*.md is checked, so a broken example fails the suite.

- Python blocks run as written on CPU, each on its own in a scratch folder; a block that trains
  with the HF Trainer must show its logged loss falling.
- Shell blocks may only name files of the checkout that exist, and options the example scripts
  accept (their ``parse_args``); what they run is tested elsewhere (tests/test_train_example.py,
  tests/test_fsdp.py, the bench suites), or needs a GPU.
- Other fenced blocks must say ``text`` (output, nothing to run): no block goes unchecked by accident.
- Every docs page is linked from the README, and every relative link resolves.
"""
import importlib.util
import pathlib
import re
import shlex
from typing import List, NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


class Block(NamedTuple):
    page: pathlib.Path
    line: int  # of the block's first code line in the page
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: pathlib.Path) -> List[Block]:
    text = page.read_text(encoding="utf-8")
    return [Block(page, text.count("\n", 0, m.start(2)) + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)]


ALL = [block for page in PAGES for block in blocks(page)]
PYTHON = [b for b in ALL if b.language == "python"]
SHELL = [b for b in ALL if b.language == "bash"]


def test_pages_have_examples_and_every_block_is_checked():
    assert any(b.page == README for b in PYTHON), "README.md lost its Python examples"
    assert DOCS, "docs/ lost its pages"
    unchecked = [f"{b.name} ({b.language or 'no language'})" for b in ALL if b.language not in ("python", "bash", "text")]
    assert not unchecked, f"blocks that are neither python, bash nor text: {unchecked}"


def run(block: Block) -> dict:
    """Execute a Python block; tracebacks and warnings name the markdown file and its line."""
    code = "\n" * (block.line - 1) + block.code
    namespace = {"__name__": "__docs_example__"}
    exec(compile(code, str(block.page), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_block_runs(block, tmp_path, monkeypatch):
    """As a newcomer runs it on a CPU: the PyTorch paths, not the Triton interpreter that conftest.py
    switches on for the kernel tests (dept_fast decides per call, so unsetting it here is enough)."""
    monkeypatch.chdir(tmp_path)  # examples that save checkpoints write into a scratch folder
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    namespace = run(block)
    trainers = [value for value in namespace.values() if type(value).__name__ == "Trainer"]
    for trainer in trainers:
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) >= 2 and losses[-1] < losses[0], f"{block.name}: the Trainer's loss did not fall: {losses}"


def test_the_readme_has_a_trainer_example_that_saves_and_reloads_the_adapter():
    code = "\n".join(b.code for b in PYTHON if b.page == README)
    for needed in ("Trainer(", "param_groups(", "optimizers=(", "data_collator=", "model.dept.save_pretrained(",
                   "load_dept(", ".generate("):
        assert needed in code, f"README.md's Trainer example lost {needed!r}"


def _check_script(path: str, args: List[str], where: str) -> None:
    script = ROOT / path
    assert script.is_file(), f"{where}: {path} does not exist"
    if script.suffix == ".py" and script.parent.name == "examples":
        spec = importlib.util.spec_from_file_location(f"_docs_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            module.parse_args(args)
        except SystemExit as error:
            raise AssertionError(f"{where}: {path} does not accept {shlex.join(args)}") from error


def check_command(words: List[str], where: str) -> None:
    """One shell command of a docs block: the files it names exist, example options parse."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OUT=out ...
        words = words[1:]
    command, args = words[0], words[1:]
    if command in ("python", "python3"):
        if args[0] == "-m":
            module = ROOT / (args[1].replace(".", "/") + ".py")
            assert module.is_file(), f"{where}: no module {args[1]} in the checkout"
        else:
            _check_script(args[0], args[1:], where)
    elif command == "bash":
        _check_script(args[0], args[1:], where)
    elif command == "torchrun":
        script = next(i for i, arg in enumerate(args) if arg.endswith(".py"))
        _check_script(args[script], args[script + 1:], where)
    elif command == "pytest":
        for i, arg in enumerate(args):
            if not arg.startswith("-") and (i == 0 or args[i - 1] not in ("-k", "-m")) and "=" not in arg:
                assert (ROOT / arg).exists(), f"{where}: pytest path {arg} does not exist"
    elif command != "pip":
        raise AssertionError(f"{where}: tests/test_readme.py has no check for `{command}`; add one")


@pytest.mark.parametrize("block", SHELL, ids=[b.name for b in SHELL])
def test_shell_block_names_what_exists(block):
    for offset, line in enumerate(block.code.splitlines()):
        line = line.split(" #", 1)[0].strip()
        for command in filter(None, (part.strip() for part in line.split("&&"))):
            check_command(shlex.split(command), f"{block.page.relative_to(ROOT)}:{block.line + offset}")


def test_docs_pages_are_linked_from_the_readme_and_links_resolve():
    readme_links = set(LINK.findall(README.read_text(encoding="utf-8")))
    unlinked = [str(p.relative_to(ROOT)) for p in DOCS if str(p.relative_to(ROOT)) not in readme_links]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if not path or re.match(r"[a-z]+:", path):
                continue  # an anchor on the page, or a URL
            resolved = (page.parent / path).resolve()
            inside = resolved.is_relative_to(ROOT)  # a clone holds nothing outside the checkout
            if not inside or not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to nothing: {broken}"
