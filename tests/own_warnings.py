"""Deprecation warnings caused by our own code fail the suite (tests/conftest.py installs this).

"Our code" is every file of this checkout that ships or runs in the suite: dept_fast/, kernels/,
tests/, bench/, examples/ and the README's and docs/' examples (tests/test_readme.py compiles
them under their markdown file's name). A FutureWarning or DeprecationWarning is ours when

- our code issues it, or names one of our frames as its origin (its ``stacklevel``), or
- our code called the API that issued it: walking out from where it was issued, past the rest of
  the issuing package and past torch and the standard library (module calls, decorators), the
  first frame reached is ours. A library's own use of a deprecated API (PEFT reading
  ``model.is_gradient_checkpointing``) reaches the library first and is not ours.

Such a warning is raised as an exception of its own category where it is issued (the way a
``filterwarnings = error`` entry raises it), so the test that caused it fails there with the
traceback; each one is also recorded and fails the session at its end, in case library code
swallowed the exception. ``dept_fast/compat.py`` holds the names that differ between the
transformers releases we support.
"""
import os
import pathlib
import sys
import sysconfig
import warnings
from types import FrameType
from typing import List, Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
OURS = tuple(f"{ROOT / name}{os.sep}" for name in ("dept_fast", "kernels", "tests", "bench", "examples", "docs"))
OUR_FILES = (str(ROOT / "README.md"),)
STDLIB = tuple(f"{path}{os.sep}" for path in {sysconfig.get_paths()["stdlib"], os.path.dirname(os.__file__)})
TORCH = os.path.join(os.path.dirname(__import__("torch").__file__), "")
CATEGORIES = (DeprecationWarning, FutureWarning)
recorded: List[str] = []
_original_warn = warnings.warn


def ours(frame: Optional[FrameType]) -> bool:
    """Whether a frame runs code of this checkout (an installed dept_fast counts too)."""
    if frame is None:
        return False
    name = os.path.abspath(frame.f_code.co_filename)
    return name.startswith(OURS) or name in OUR_FILES or f"{os.sep}site-packages{os.sep}dept_fast{os.sep}" in name


def _package(frame: FrameType) -> str:
    """The top-level package (or module file) a frame's code belongs to, by the sys.path entry holding it."""
    name = os.path.abspath(frame.f_code.co_filename)
    entries = [os.path.abspath(entry) for entry in sys.path if entry and name.startswith(os.path.abspath(entry) + os.sep)]
    if not entries:
        return name
    base = max(entries, key=len)
    return os.path.join(base, name[len(base) + 1:].split(os.sep, 1)[0])


def _plumbing(frame: FrameType) -> bool:
    """torch (module calls, checkpointing) and the standard library (decorators): not where a call came from."""
    name = frame.f_code.co_filename
    if name.startswith("<frozen "):
        return True
    name = os.path.abspath(name)
    return name.startswith(TORCH) or (name.startswith(STDLIB) and not any(
        f"{os.sep}{packages}{os.sep}" in name for packages in ("site-packages", "dist-packages")))


def our_cause(issuer: FrameType, named: Optional[FrameType]) -> Optional[FrameType]:
    """Our frame that caused a warning issued in ``issuer`` and attributed to ``named``, or None."""
    for frame in (issuer, named):
        if ours(frame):
            return frame
    package, frame = _package(issuer), issuer
    while frame is not None and (_package(frame) == package or _plumbing(frame)):
        frame = frame.f_back
    return frame if ours(frame) else None


def warn(message, category=None, stacklevel=1, *args, **kwargs):
    """``warnings.warn`` that raises a deprecation warning our code caused (see the module docstring)."""
    if category is None:
        category = type(message) if isinstance(message, Warning) else UserWarning
    if issubclass(category, CATEGORIES):
        issuer = sys._getframe(1)
        named = issuer
        for _ in range(max(stacklevel, 1) - 1):
            named = named.f_back if named is not None else None
        cause = our_cause(issuer, named)
        if cause is not None:
            where = f"{os.path.relpath(cause.f_code.co_filename, ROOT)}:{cause.f_lineno}"
            text = (f"{message} [{category.__name__} caused by our code at {where}: use the current API, "
                    f"with a fallback in dept_fast/compat.py for older transformers]")
            recorded.append(text)
            raise category(text)
    return _original_warn(message, category, stacklevel + 1, *args, **kwargs)


def install() -> None:
    warnings.warn = warn


def uninstall() -> None:
    warnings.warn = _original_warn
