"""The ``dept_fast`` namespace holds the package alone: its ``__path__`` lists no ``setup``, ``bench``,
``tests`` or ``examples`` (``import dept_fast.setup`` used to run setup.py), and ``dept_fast.kernels``
(the checkout's top-level ``kernels/`` folder) imports both installed and from a source checkout on
PYTHONPATH, without the folder answering to the top-level name ``kernels`` where it is installed; a
second checkout on PYTHONPATH beside an editable install takes its own kernels."""
import os
import pathlib
import pkgutil
import site
import subprocess
import sys

import dept_fast

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOT_OURS = {"setup", "bench", "tests", "examples", "kernels"}

# Run in a fresh interpreter: where dept_fast and dept_fast.kernels come from, what the package lists.
PROBE = """
import importlib, importlib.util, pkgutil, sys
import dept_fast, dept_fast.kernels
print("DEPT_FAST", dept_fast.__file__)
print("KERNELS", dept_fast.kernels.__file__, dept_fast.kernels.dept_forward.__module__)
print("LISTS", sorted(module.name for module in pkgutil.iter_modules(dept_fast.__path__)))
try:
    importlib.import_module("dept_fast.setup")
    print("SETUP imported")
except ImportError:
    print("SETUP absent")
spec = importlib.util.find_spec("kernels")
print("TOP_LEVEL_KERNELS", spec.origin if spec else None)
"""


def probe(env: dict, *flags: str) -> dict:
    proc = subprocess.run([sys.executable, *flags, "-c", PROBE], cwd=ROOT.parent, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0].isupper())


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TRITON_INTERPRET="1", **extra)
    return env


def test_the_package_lists_only_its_own_modules():
    listed = {module.name for module in pkgutil.iter_modules(dept_fast.__path__)}
    assert listed and not listed & NOT_OURS, listed
    assert {"ops", "modules", "hf", "checkpoint"} <= listed


def test_installed_kernels_resolve_as_dept_fast_kernels():
    """The suite's own install (editable in CI): the folder is dept_fast.kernels, never ``kernels``."""
    got = probe(clean_env())
    assert got["KERNELS"].split()[0] == str(ROOT / "kernels" / "__init__.py")
    assert got["KERNELS"].split()[1] == "dept_fast.kernels.dept_forward"
    assert not NOT_OURS & set(eval(got["LISTS"])) and got["SETUP"] == "absent"
    assert not got["TOP_LEVEL_KERNELS"].startswith(str(ROOT / "kernels")), got["TOP_LEVEL_KERNELS"]


def test_a_source_checkout_on_pythonpath_finds_dept_fast_kernels():
    """Not installed: ``python -S`` skips the site-packages' .pth files (the editable install's finder);
    the site-packages go back on sys.path as plain folders, for torch and triton, and the checkout
    comes from PYTHONPATH alone."""
    folders = [path for path in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(path)]
    env = clean_env(PYTHONPATH=os.pathsep.join([str(ROOT), *folders]))
    got = probe(env, "-S")
    assert got["DEPT_FAST"] == str(ROOT / "dept_fast" / "__init__.py")
    assert got["KERNELS"].split() == [str(ROOT / "kernels" / "__init__.py"), "dept_fast.kernels.dept_forward"]
    assert not NOT_OURS & set(eval(got["LISTS"])) and got["SETUP"] == "absent"


def test_a_second_checkout_on_pythonpath_takes_its_own_kernels(tmp_path):
    """Another checkout (a git worktree) on PYTHONPATH beside the editable install of this one: its
    dept_fast takes the kernels beside it, never the installed checkout's (the editable finder maps
    dept_fast.kernels to the folder it was installed from)."""
    import shutil

    for folder in ("dept_fast", "kernels"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    got = probe(clean_env(PYTHONPATH=str(tmp_path)))
    assert got["DEPT_FAST"] == str(tmp_path / "dept_fast" / "__init__.py")
    assert got["KERNELS"].split() == [str(tmp_path / "kernels" / "__init__.py"), "dept_fast.kernels.dept_forward"]
