"""Crash safety of adapter saves: a save that fails or is interrupted at any of its write steps
leaves the previous checkpoint or the new one, exactly, never a mix, and no temporary file.

Each write step of ``dept_fast.checkpoint.files`` (creating a temporary file, writing it, fsync,
each ``os.replace``, the directory sync) is made to fail in turn, with a disk-full ``OSError``
(the failing write writes half its bytes first) and with ``KeyboardInterrupt``. The old and the new
adapter have the same shapes and different numbers and ``lora_alpha``, so a mix of the two would
load without error: only comparing what loads with both tells it apart.
"""
import errno
import json
import os
import tempfile

import pytest
import torch

from dept_fast import FusedDePTEmbedding, apply_dept, apply_prefix_tuning, load_prefix_tuning
from dept_fast.checkpoint import files
from tiny_models import tiny_gpt2

DEPT_FILES = sorted(["dept_config.json", "dept_model.safetensors"])
PREFIX_FILES = sorted(["dept_prefix_config.json", "dept_prefix.safetensors"])


class FailingFile:
    """A file object whose ``write`` is a step of :class:`WriteSteps`."""

    def __init__(self, file, steps: "WriteSteps") -> None:
        self.file, self.steps = file, steps

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def write(self, data: bytes) -> int:
        if self.steps.step("write"):
            self.file.write(data[: len(data) // 2])  # a disk-full write: half the bytes land, then the error
            raise self.steps.error
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


class WriteSteps:
    """Record the write steps of a save, and raise ``error`` at step number ``fail_at`` (None: never)."""

    def __init__(self, monkeypatch, fail_at=None, error=None) -> None:
        self.names, self.fail_at, self.error = [], fail_at, error
        for owner, name in ((tempfile, "mkstemp"), (os, "fsync"), (os, "replace")):
            monkeypatch.setattr(owner, name, self.wrap(name, getattr(owner, name)))
        real_open = open
        monkeypatch.setattr(files, "open", lambda *a, **k: FailingFile(real_open(*a, **k), self), raising=False)

    def step(self, name: str) -> bool:
        """Count step ``name``; True when it is the one to fail."""
        self.names.append(name)
        return len(self.names) - 1 == self.fail_at

    def wrap(self, name, real):
        def step(*args, **kwargs):
            if self.step(name):
                raise self.error
            return real(*args, **kwargs)
        return step


def steps_of(save, directory, monkeypatch):
    """The names of the write steps of a save that succeeds."""
    with monkeypatch.context() as patch:
        steps = WriteSteps(patch)
        save(directory)
    return steps.names


def dept_model(seed: int, lora_alpha: float):
    base = tiny_gpt2()
    torch.manual_seed(seed)  # after the base, which seeds its own initialisation
    model = apply_dept(base, 3, 4, 16, lora_alpha=lora_alpha)
    with torch.no_grad():
        model.dept.lora_B.normal_()  # B starts at zero: give both adapters an update of their own
    return model


def dept_state(adapter: FusedDePTEmbedding):
    """An adapter's config and tensors, as a dict."""
    return {"lora_alpha": adapter.lora_alpha, "rank": adapter.rank, "max_length": adapter.max_length,
            **{name: getattr(adapter, name).detach().clone() for name in ("prompt", "lora_A", "lora_B")}}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


def read_dept(directory):
    return dept_state(FusedDePTEmbedding.from_pretrained(directory, tiny_gpt2().get_input_embeddings()))


def prefix_model(seed: int):
    base = tiny_gpt2()
    torch.manual_seed(seed)
    return apply_prefix_tuning(base, 3, projection_dim=8)


def prefix_state(model):
    return {key: value.clone() for key, value in model.prefix_tuning.state_dict().items()}


ERRORS = [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()]
ADAPTERS = {
    "dept": (lambda seed: dept_model(seed, lora_alpha=5.0 + seed), lambda m: m.dept.save_pretrained,
             lambda m: dept_state(m.dept), read_dept, DEPT_FILES),
    "prefix": (prefix_model, lambda m: m.prefix_tuning.save_pretrained, prefix_state,
               lambda d: prefix_state(load_prefix_tuning(tiny_gpt2(), d)), PREFIX_FILES),
}


@pytest.mark.parametrize("error", ERRORS, ids=["disk-full", "interrupt"])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_failed_save_leaves_the_old_or_the_new_checkpoint(adapter, error, tmp_path, monkeypatch):
    build, saver, state, read, names = ADAPTERS[adapter]
    old, new = build(1), build(2)
    want_old, want_new = state(old), state(new)
    assert not any(same({k: want_old[k]}, {k: want_new[k]}) for k in want_old if k not in ("rank", "max_length"))
    steps = steps_of(saver(new), tmp_path / "clean", monkeypatch)
    assert steps == ["mkstemp", "write", "fsync", "replace"] * 2 + ["fsync"]  # tensors, json, directory
    tensors_in_place = steps.index("replace")  # after this step the new tensors are the directory's
    for fail_at, step in enumerate(steps):
        directory = tmp_path / f"step{fail_at}"
        saver(old)(directory)
        with monkeypatch.context() as patch:
            WriteSteps(patch, fail_at, error)
            with pytest.raises(type(error)):
                saver(new)(directory)
        assert sorted(os.listdir(directory)) == names, f"leftover files after failing at {step} (step {fail_at})"
        want = want_new if fail_at > tensors_in_place else want_old
        assert same(read(directory), want), f"failing at {step} (step {fail_at})"


@pytest.mark.parametrize("error", ERRORS, ids=["disk-full", "interrupt"])
def test_a_failed_first_save_leaves_nothing_or_the_new_checkpoint(error, tmp_path, monkeypatch):
    new = dept_model(2, lora_alpha=7.0)
    steps = steps_of(new.dept.save_pretrained, tmp_path / "clean", monkeypatch)
    for fail_at in range(len(steps)):
        directory = tmp_path / f"step{fail_at}"
        with monkeypatch.context() as patch:
            WriteSteps(patch, fail_at, error)
            with pytest.raises(type(error)):
                new.dept.save_pretrained(directory)
        if fail_at <= steps.index("replace"):
            assert os.listdir(directory) == []
        else:  # the tensors (with the config in their header) are in place, the json maybe not
            assert same(read_dept(directory), dept_state(new.dept))


def test_tensors_renamed_in_but_json_not_loads_the_new_checkpoint(tmp_path, monkeypatch):
    """The json keeps the old save_id; the tensors' header has the new one, and its config is used."""
    old, new = dept_model(1, lora_alpha=5.0), dept_model(2, lora_alpha=7.0)
    steps = steps_of(new.dept.save_pretrained, tmp_path / "clean", monkeypatch)
    json_in_place = len(steps) - 1 - steps[::-1].index("replace")  # the json's os.replace
    old.dept.save_pretrained(tmp_path)
    old_json = json.loads((tmp_path / "dept_config.json").read_text())
    with monkeypatch.context() as patch:
        WriteSteps(patch, json_in_place, OSError(errno.EIO, "I/O error"))
        with pytest.raises(OSError, match="I/O error"):
            new.dept.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "dept_config.json").read_text()) == old_json  # lora_alpha 5 beside new tensors
    loaded = read_dept(tmp_path)
    assert same(loaded, dept_state(new.dept)) and loaded["lora_alpha"] == 7.0


def test_a_hand_edited_json_is_honoured(tmp_path):
    """Same save_id as the tensors: the json is the config (edits included)."""
    dept_model(1, lora_alpha=5.0).dept.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "dept_config.json").read_text())
    (tmp_path / "dept_config.json").write_text(json.dumps({**config, "lora_alpha": 11.0}))
    assert read_dept(tmp_path)["lora_alpha"] == 11.0
    # An edit that drops the save_id no longer matches the tensors: their header's config is used.
    (tmp_path / "dept_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "save_id"} |
                                                          {"lora_alpha": 11.0}))
    assert read_dept(tmp_path)["lora_alpha"] == 5.0


def test_a_save_over_a_checkpoint_replaces_it_whole(tmp_path):
    """Resaving a changed adapter: the json and the tensors' header agree on the new save."""
    model = dept_model(1, lora_alpha=5.0)
    model.dept.save_pretrained(tmp_path)
    first = json.loads((tmp_path / "dept_config.json").read_text())["save_id"]
    with torch.no_grad():
        model.dept.prompt.mul_(2)
    model.dept.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "dept_config.json").read_text())
    metadata = files.Tensors([str(tmp_path / "dept_model.safetensors")]).metadata
    assert config["save_id"] != first
    assert json.loads(metadata[files.CONFIG_METADATA_KEY])["save_id"] == config["save_id"]
    assert same(read_dept(tmp_path), dept_state(model.dept))
