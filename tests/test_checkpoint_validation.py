"""What checkpoint readers refuse, and when: every malformed config key of every format gets a
ValueError naming the file and the key; sizes are checked against the files' headers before any
adapter or tensor is allocated (a ~2 KB checkpoint claiming 20M positions is refused); fp64 and
non-float tensors are refused at load and at construction.

Formats: ours (DePT, Prefix-Tuning: json or, when the json is missing, the config in the tensors'
header), the DePT authors' PROMPT_TUNING_LORA, PEFT PROMPT_TUNING and PREFIX_TUNING (files written
here as those libraries write them), and a whole-model save (``config.json`` under ``dept_fast``).
"""
import contextlib
import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dept_fast import FusedDePTEmbedding, FusedPrefixEncoder, apply_dept, apply_prefix_tuning, load_dept, \
    load_prefix_tuning
from dept_fast.checkpoint import files
from tiny_models import VOCAB, tiny_gpt2, tiny_t5

M, R, S, P = 3, 4, 16, 3
D = tiny_gpt2().config.n_embd
MISSING = object()
HUGE = 20_000_000
BAD = {  # values no key of that kind accepts
    "int": ["3", 2.5, True, -1, [3], {"value": 3}],
    "number": ["8", math.nan, math.inf, -math.inf, True, [8.0]],
    "bool": ["false", "true", 0, 1, "no"],
}


def trained(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


def write_peft(path, config, tensors, bin_file=False):
    """A PEFT-style adapter directory (adapter_config.json + adapter_model.safetensors / .bin)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    if bin_file:
        torch.save(tensors, path / "adapter_model.bin")
    else:
        save_file(tensors, path / "adapter_model.safetensors")


def make_ours_dept(path):
    trained(apply_dept(tiny_gpt2(), M, R, S)).dept.save_pretrained(path)


def make_ours_prefix(path):
    trained(apply_prefix_tuning(tiny_gpt2(), P, projection_dim=8)).prefix_tuning.save_pretrained(path)


def make_authors(path, bin_file=False):
    write_peft(path, {"peft_type": "PROMPT_TUNING_LORA", "num_virtual_tokens": M, "num_transformer_submodules": 1,
                      "r": R, "lora_alpha": 16, "max_length": S, "token_dim": D, "load_lora_embeddings": True,
                      "load_lora_embedding_B": True},
               {"prompt_embeddings": torch.randn(M, D), "prompt_encoder.lora_embedding_A": torch.randn(S, R),
                "prompt_encoder.lora_embedding_B": torch.randn(R, D)}, bin_file)


def make_peft_prompt(path):
    write_peft(path, {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": M, "num_transformer_submodules": 1},
               {"prompt_embeddings": torch.randn(M, D)})


def make_peft_prefix(path):
    write_peft(path, {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": P, "num_layers": 2, "num_attention_heads": 4,
                      "token_dim": D, "num_transformer_submodules": 1},
               {"prompt_embeddings": torch.randn(P, 2 * 2 * D)})


def make_whole_dept(path):
    trained(apply_dept(tiny_gpt2(), M, R, S)).save_pretrained(path)


def make_whole_prefix(path):
    trained(apply_prefix_tuning(tiny_gpt2(), P, projection_dim=8)).save_pretrained(path)


def read_dept(path):
    return FusedDePTEmbedding.from_pretrained(path, nn.Embedding(VOCAB, D))


def read_prefix(path):
    return load_prefix_tuning(tiny_gpt2(), path)


def rewrite(file, cast=None, names=(), **config):
    """Rewrite safetensors ``file``, its header's metadata kept but for the dept_fast config in it,
    updated with ``config``; the tensors named in ``names`` cast to ``cast``."""
    tensors, metadata = load_file(file), files.Tensors([str(file)]).metadata
    if config:
        stored = json.loads(metadata[files.CONFIG_METADATA_KEY])
        metadata[files.CONFIG_METADATA_KEY] = json.dumps({**stored, **config})
    save_file({k: v.to(cast) if k in names else v for k, v in tensors.items()}, file, metadata)


def header_config_only(original, directory, **config):
    """A copy of our DePT checkpoint without its json (a first save interrupted between its
    renames), the config in the tensors' header updated with ``config``; returns the tensors' file."""
    shutil.copytree(original, directory, dirs_exist_ok=True)
    os.remove(directory / "dept_config.json")
    rewrite(directory / "dept_model.safetensors", **config)
    return directory / "dept_model.safetensors"


# format -> (maker, config file, reader, the config's keys: (kind, whether it may be missing, whether
# null is accepted))
FORMAT_KEYS = {"format": ("format", False, False), "format_version": ("format", False, False)}
DEPT_KEYS = {**FORMAT_KEYS, "num_prompt_tokens": ("int", False, False), "rank": ("int", False, False),
             "max_length": ("int", False, False), "lora_alpha": ("number", False, False),
             "hidden_size": ("int", True, True)}
PREFIX_KEYS = {**FORMAT_KEYS, "prefix_len": ("int", False, False), "stacks": ("stacks", False, False),
               **{f"stacks.decoder.{key}": ("int", False, False) for key in ("num_layers", "num_kv_heads", "head_dim")},
               **{f"stacks.decoder.{key}": ("int", True, True) for key in ("projection_dim", "embed_dim")}}
FORMATS = {
    "dept": (make_ours_dept, "dept_config.json", read_dept, DEPT_KEYS),
    "prefix": (make_ours_prefix, "dept_prefix_config.json", read_prefix, PREFIX_KEYS),
    "authors": (make_authors, "adapter_config.json", read_dept, {
        "peft_type": ("peft_type", False, False), "num_virtual_tokens": ("int", False, False),
        "num_transformer_submodules": ("int", True, True), "r": ("int", True, False),
        "lora_alpha": ("number", True, False), "max_length": ("int", True, False),
        "load_lora_embeddings": ("bool", True, False), "load_lora_embedding_B": ("bool", True, False)}),
    "peft-prompt": (make_peft_prompt, "adapter_config.json", read_dept, {
        "peft_type": ("peft_type", False, False), "num_virtual_tokens": ("int", False, False),
        "num_transformer_submodules": ("int", True, True)}),
    "peft-prefix": (make_peft_prefix, "adapter_config.json", read_prefix, {
        "peft_type": ("peft_type", False, False), "num_transformer_submodules": ("int", True, True),
        **{key: ("int", False, False) for key in ("num_virtual_tokens", "num_layers", "num_attention_heads",
                                                   "token_dim")}}),
    # A missing or null record is a model saved without that adapter: FileNotFoundError, tested elsewhere.
    "whole-dept": (make_whole_dept, "config.json", read_dept, {
        "dept_fast": ("object", True, True), "dept_fast.dept": ("object", True, True),
        "dept_fast.dept.default": ("object", True, True),
        **{f"dept_fast.dept.default.{key}": spec for key, spec in DEPT_KEYS.items()}}),
    "whole-prefix": (make_whole_prefix, "config.json", read_prefix, {
        "dept_fast.prefix_tuning": ("object", True, True), "dept_fast.prefix_tuning.default": ("object", True, True),
        **{f"dept_fast.prefix_tuning.default.{key}": spec for key, spec in PREFIX_KEYS.items()}}),
}
CASES = [(name, key) for name, spec in FORMATS.items() for key in spec[3]]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """One valid checkpoint directory per format, copied by each test that edits one."""
    root = tmp_path_factory.mktemp("originals")
    for name, (make, *_) in FORMATS.items():
        make(root / name)
    return root


def edited(data, dotted, value):
    """``data`` with the key at ``dotted`` (``a.b.c``) set to ``value`` (MISSING: deleted)."""
    data = json.loads(json.dumps(data))
    *parents, key = dotted.split(".")
    node = data
    for parent in parents:
        node = node[parent]
    if value is MISSING:
        del node[key]
    else:
        node[key] = value
    return data


def bad_values(kind, may_be_missing, may_be_null):
    values = {**BAD, "stacks": [[], "decoder", {}, {"decoder": 3}], "object": [[], "dept", 3],
              "format": ["something else", 2, None], "peft_type": ["LORA", 5, None]}[kind]
    return values + ([] if may_be_missing else [MISSING]) + ([] if may_be_null or None in values else [None])


@pytest.mark.parametrize("name, key", CASES)
def test_every_malformed_key_is_named_with_its_file(name, key, originals, tmp_path):
    _, config_name, read, keys = FORMATS[name]
    kind, may_be_missing, may_be_null = keys[key]
    original = json.loads((originals / name / config_name).read_text())
    for value in bad_values(kind, may_be_missing, may_be_null):
        directory = tmp_path / "checkpoint"
        shutil.copytree(originals / name, directory, dirs_exist_ok=True)
        (directory / config_name).write_text(json.dumps(edited(original, key, value)))
        with pytest.raises(ValueError) as error:
            read(directory)
        message = str(error.value)
        assert str(directory / config_name) in message and key.split(".")[-1] in message, (value, message)


@pytest.mark.parametrize("key", ["num_prompt_tokens", "rank", "max_length", "lora_alpha"])
def test_a_malformed_config_in_the_header_is_named_too(key, originals, tmp_path):
    """No json (a first save interrupted between its renames): the header's config is read, and checked."""
    weights = header_config_only(originals / "dept", tmp_path, **{key: "1"})
    with pytest.raises(ValueError, match=re.escape(f"{weights} (the config in its header): key {key!r}")):
        read_dept(tmp_path)


@pytest.mark.parametrize("name", FORMATS)
def test_config_files_that_are_not_json_objects(name, originals, tmp_path):
    _, config_name, read, _ = FORMATS[name]
    shutil.copytree(originals / name, tmp_path, dirs_exist_ok=True)
    for text, match in (("[1, 2]", "must hold a json object, got list"), ("{not json", "is not valid json"),
                        ("\xff\xfe", "is not valid json")):
        (tmp_path / config_name).write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / config_name} ") + match):
            read(tmp_path)


def test_the_authors_false_strings_are_not_true(originals, tmp_path):
    """``"load_lora_embeddings": "false"`` is refused (a truthy string would load the update)."""
    shutil.copytree(originals / "authors", tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("load_lora_embeddings", "load_lora_embedding_B"):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, key: "false"}))
        with pytest.raises(ValueError, match=f"key '{key}' must be true or false"):
            read_dept(tmp_path)
    # B's flag is checked even where A's false means it is not used.
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "load_lora_embeddings": False,
                                                              "load_lora_embedding_B": "false"}))
    with pytest.raises(ValueError, match="key 'load_lora_embedding_B' must be true or false"):
        read_dept(tmp_path)
    # And a real false leaves the update at zero, as the authors' loader does.
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "load_lora_embeddings": False}))
    assert torch.count_nonzero(read_dept(tmp_path).lora_B) == 0


# ---------------------------------------------------------------------------------------------
# Sizes before allocation


@contextlib.contextmanager
def no_allocation(monkeypatch):
    """Building an adapter or loading a tensor fails the test: a refusal must come before either."""
    def allocates(*args, **kwargs):
        raise AssertionError("allocated before the checkpoint's sizes were checked")
    with monkeypatch.context() as patch:
        patch.setattr(FusedDePTEmbedding, "__init__", allocates)
        patch.setattr(FusedPrefixEncoder, "__init__", allocates)
        patch.setattr(files.Tensors, "load", allocates)
        yield


def size_of(directory):
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))


def claim(directory, config_name, dotted, value):
    data = json.loads((directory / config_name).read_text())
    (directory / config_name).write_text(json.dumps(edited(data, dotted, value)))


ABSURD = [  # (format, key, claimed value, tensor whose header shape refuses it)
    ("dept", "max_length", HUGE, "lora_A"), ("dept", "rank", 10 ** 9, "lora_A"),
    ("dept", "num_prompt_tokens", 10 ** 9, "prompt"),
    ("prefix", "prefix_len", 10 ** 8, "embedding.weight"),
    ("prefix", "stacks.decoder.projection_dim", 10 ** 9, "proj_in"),
    ("prefix", "stacks.decoder.num_layers", 10 ** 6, "proj_out"),
    ("authors", "max_length", HUGE, "lora_A"), ("authors", "r", 10 ** 9, "lora_A"),
    ("peft-prompt", "num_virtual_tokens", 10 ** 9, "prompt_embeddings"),
    ("peft-prefix", "num_virtual_tokens", 10 ** 8, "prompt_embeddings"),
    ("peft-prefix", "num_layers", 10 ** 6, "prompt_embeddings"),
    ("whole-dept", "dept_fast.dept.default.max_length", HUGE, "lora_A"),
    ("whole-prefix", "dept_fast.prefix_tuning.default.prefix_len", 10 ** 8, "embedding.weight"),
]


@pytest.mark.parametrize("name, key, value, tensor", ABSURD)
def test_absurd_sizes_are_refused_before_allocating(name, key, value, tensor, originals, tmp_path, monkeypatch):
    _, config_name, read, _ = FORMATS[name]
    shutil.copytree(originals / name, tmp_path, dirs_exist_ok=True)
    if not name.startswith("whole"):
        assert size_of(tmp_path) < 16384  # a few KB claiming gigabytes
    claim(tmp_path, config_name, key, value)
    with no_allocation(monkeypatch), pytest.raises(ValueError, match=f"{tensor}.*(shape|rows|do not match)"):
        read(tmp_path)


def test_absurd_sizes_in_the_header_config_are_refused_before_allocating(originals, tmp_path, monkeypatch):
    header_config_only(originals / "dept", tmp_path, max_length=HUGE)
    with no_allocation(monkeypatch), pytest.raises(ValueError, match=r"lora_A has shape \(16, 4\), expected \(2000"):
        read_dept(tmp_path)


def test_the_authors_bin_files_are_checked_before_loading(tmp_path, monkeypatch):
    """``.bin``: memory-mapped, so its shapes are read without loading; the same refusal."""
    make_authors(tmp_path, bin_file=True)
    claim(tmp_path, "adapter_config.json", "max_length", HUGE)
    with no_allocation(monkeypatch), pytest.raises(ValueError, match=r"lora_A has shape \(16, 4\), expected \(2000"):
        read_dept(tmp_path)


def test_a_model_without_position_limit_is_protected_too(tmp_path, monkeypatch):
    """T5 has relative positions (no max_position_embeddings): the header check alone refuses."""
    trained(apply_dept(tiny_t5(), M, R, S)).dept.save_pretrained(tmp_path)
    claim(tmp_path, "dept_config.json", "max_length", HUGE)
    model = tiny_t5()
    with no_allocation(monkeypatch), pytest.raises(ValueError, match=r"lora_A has shape"):
        load_dept(model, tmp_path)


# ---------------------------------------------------------------------------------------------
# Dtypes


@pytest.mark.parametrize("dtype, name", [(torch.float64, "F64"), (torch.int64, "I64"), (torch.bool, "BOOL")])
@pytest.mark.parametrize("fmt, weights, tensor", [
    ("dept", "dept_model.safetensors", "lora_B"), ("prefix", "dept_prefix.safetensors", "decoder.proj_out.bias"),
    ("authors", "adapter_model.safetensors", "prompt_encoder.lora_embedding_A"),
    ("peft-prefix", "adapter_model.safetensors", "prompt_embeddings"),
    ("whole-dept", "model.safetensors", "dept_adapters.default.prompt"),
    ("whole-prefix", "model.safetensors", "prefix_adapters.default.encoders.decoder.embedding.weight")])
def test_non_float32_16_tensors_are_refused_at_load(fmt, weights, tensor, dtype, name, originals, tmp_path):
    _, _, read, _ = FORMATS[fmt]
    shutil.copytree(originals / fmt, tmp_path, dirs_exist_ok=True)
    rewrite(tmp_path / weights, dtype, {tensor})
    short = tensor.removeprefix("prefix_adapters.default.encoders.").removeprefix("dept_adapters.default.")
    with pytest.raises(ValueError, match=re.escape(f"tensor {short!r} has dtype {name}; adapter tensors must be "
                                                   "float32, float16 or bfloat16")):
        read(tmp_path)


def test_fp64_bin_tensors_are_refused_at_load(tmp_path):
    make_authors(tmp_path, bin_file=True)
    tensors = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    torch.save({**tensors, "prompt_embeddings": tensors["prompt_embeddings"].double()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="'prompt_embeddings' has dtype torch.float64"):
        read_dept(tmp_path)


def test_fp64_is_refused_at_construction():
    with pytest.raises(TypeError, match="word embeddings must be float32, float16 or bfloat16, got torch.float64"):
        FusedDePTEmbedding(nn.Embedding(VOCAB, 8, dtype=torch.float64), M, R, S)
    with pytest.raises(TypeError, match="word embeddings must be float32, float16 or bfloat16, got torch.float64"):
        apply_dept(tiny_gpt2().double(), M, R, S)
    for dtype in (torch.float64, torch.int64):
        with pytest.raises(TypeError, match=f"prefix parameters must be float32, float16 or bfloat16, got {dtype}"):
            FusedPrefixEncoder(P, 2, 4, 10, dtype=dtype)
    with pytest.raises(TypeError, match="prefix parameters must be float32, float16 or bfloat16, got torch.float64"):
        apply_prefix_tuning(tiny_gpt2().double(), P)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # dtype=None takes the default: refused as well, not built in fp64
    try:
        with pytest.raises(TypeError, match="got torch.float64"):
            FusedPrefixEncoder(P, 2, 4, 10)
    finally:
        torch.set_default_dtype(default)
