"""``dept_fast.vllm.PromptEmbedder`` without vLLM: the prompts it builds are the inputs_embeds the HF
model builds, from every checkpoint format and a sharded base model (whose other shards it never
opens), in one fused launch for a ragged mixed batch; its refusals; the Completions API encoding.
(tests/test_vllm.py runs them through vLLM itself.)

Tolerance: the prompts and the HF model's inputs go through the same fused kernel (interpreted on
CPU) or, past an adapter's max_length, the per-position path; fp32 sums of r terms may differ in
order only: asserted at the fp32 tolerance of tests/numerics.py.
"""
import base64
import io
import json

import pytest
import torch
from safetensors.torch import save_file

from dept_fast import FusedDePTEmbedding, apply_dept, apply_prefix_tuning, load_dept
from dept_fast.vllm import PromptEmbedder, encode_prompt_embeds, load_input_embeddings
from numerics import TOL, rel_err
from tiny_models import VOCAB, tiny_llama, tiny_t5

ADAPTERS = {"dept": (3, 4, 16), "pt": (5, 0, 16), "small": (2, 2, 12)}
"""name -> (m, r, max_length): DePT, prompt tuning (rank 0), a DePT with a shorter max_length."""
NAMES = ["dept", "__base__", "pt", "small", "dept"]
LENGTHS = [7, 3, 12, 5, 1]


def served_model(seed=0):
    """tiny Llama with the three adapters, every adapter tensor drawn at random (B starts at zero)."""
    model = tiny_llama(seed)
    for name, (m, r, s) in ADAPTERS.items():
        apply_dept(model, m, r, s, lora_alpha=5.0, adapter_name=name, share_prompt=False)
    with torch.no_grad():
        for p in model.dept_adapters.parameters():
            if p.requires_grad:
                p.normal_()
    return model


def requests(lengths=LENGTHS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def hf_inputs_embeds(model, ids, name):
    """What the HF model feeds its decoder stack for one unpadded request (prompt in every row; a
    "__base__" request reaches it as input_ids, which the stack embeds)."""
    seen = []

    def record(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        seen.append((embeds if embeds is not None else module.get_input_embeddings()(kwargs["input_ids"])).detach())

    hook = model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), adapter_names=[name])
    finally:
        hook.remove()
    return seen[0][0]


def assert_prompts_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g, w = g["prompt_embeds"], w["prompt_embeds"] if isinstance(w, dict) else w
        assert g.shape == w.shape and g.dtype == w.dtype and g.device.type == "cpu"
        assert rel_err(g, w) <= TOL[torch.float32]


def test_prompts_are_the_hf_models_inputs_embeds():
    model = served_model()
    ids = requests()
    got = PromptEmbedder.from_model(model).prompts(ids, NAMES)
    assert [p["prompt_embeds"].shape[0] for p in got] == [ADAPTERS[n][0] + L if n != "__base__" else L
                                                          for n, L in zip(NAMES, LENGTHS)]
    assert_prompts_equal(got, [hf_inputs_embeds(model, i, n) for i, n in zip(ids, NAMES)])


def test_one_fused_launch_for_a_ragged_mixed_batch(monkeypatch):
    """The longest request (7) fits every requested adapter: one forward kernel launch for all."""
    from dept_fast import kernels

    model = served_model()
    embedder = PromptEmbedder.from_model(model)
    launches = []
    forward = kernels.dept_forward
    monkeypatch.setattr(kernels, "dept_forward", lambda *a, **k: launches.append(1) or forward(*a, **k))
    names, ids = ["dept", "pt", "__base__", "small"], requests([7, 2, 4, 5])
    got = embedder.prompts(ids, names)
    assert len(launches) == 1
    monkeypatch.setattr(kernels, "dept_forward", forward)
    assert_prompts_equal(got, [hf_inputs_embeds(model, i, n) for i, n in zip(ids, names)])


def test_requests_longer_than_another_adapters_max_length():
    """Request 2 (14 tokens, adapter s 16) pads the batch past "small"'s s 12: still each request's own."""
    model = served_model()
    names, ids = ["small", "dept", "dept"], requests([12, 3, 14])
    got = PromptEmbedder.from_model(model).prompts(ids, names)
    assert_prompts_equal(got, [hf_inputs_embeds(model, i, n) for i, n in zip(ids, names)])


def test_base_requests_alone_and_a_2d_tensor():
    model = served_model()
    ids = torch.tensor(requests([6, 6]))
    got = PromptEmbedder.from_model(model).prompts(ids, ["__base__"] * 2)
    want = model.get_input_embeddings()(ids).detach()
    assert all(torch.equal(g["prompt_embeds"], w) for g, w in zip(got, want))


def _save_authors(path, m, r, s, d):
    """The DePT authors' PROMPT_TUNING_LORA files (adapter_config.json + adapter_model.bin)."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PROMPT_TUNING_LORA", "num_virtual_tokens": m, "r": r, "lora_alpha": 5, "max_length": s}))
    torch.save({"prompt_embeddings": torch.randn(m, d), "prompt_encoder.lora_embedding_A": torch.randn(s, r),
                "prompt_encoder.lora_embedding_B": torch.randn(r, d)}, path / "adapter_model.bin")


def _save_peft(path, m, d):
    """PEFT PROMPT_TUNING files (rank 0, no max_length recorded)."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": m}))
    save_file({"prompt_embeddings": torch.randn(m, d)}, str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("base_shards", ["single", "sharded"])
def test_from_pretrained_reads_every_format(base_shards, tmp_path):
    """Ours, the DePT authors', PEFT prompt tuning, a whole-model save (the adapter named otherwise
    than it is served, and a sharded one): the prompts of load_dept + from_model."""
    base = tmp_path / "base"
    shard = {"max_shard_size": "20KB"} if base_shards == "sharded" else {}
    tiny_llama(seed=3).save_pretrained(base, **shard)
    assert (base / "model.safetensors.index.json").exists() == (base_shards == "sharded")
    d = 48
    trained = served_model()
    trained.dept_adapters["dept"].save_pretrained(tmp_path / "ours")
    _save_authors(tmp_path / "authors", 4, 3, 20, d)
    _save_peft(tmp_path / "peft", 2, d)
    whole = apply_dept(tiny_llama(seed=3), 3, 2, 10, adapter_name="trained_as")
    with torch.no_grad():
        whole.dept.lora_B.normal_()
    whole.save_pretrained(tmp_path / "whole", max_shard_size="20KB")
    dirs = {"ours": "ours", "authors": "authors", "peft": "peft", "whole": "whole"}

    embedder = PromptEmbedder.from_pretrained(base, {name: tmp_path / sub for name, sub in dirs.items()},
                                              device="cpu")
    assert embedder.adapters["peft"].max_length == 256 - 2  # the base model's position limit - m
    reference = tiny_llama(seed=3)
    saved_as = {**{name: name for name in dirs}, "whole": "trained_as"}  # load_dept reads a save by its name
    for name, sub in dirs.items():
        load_dept(reference, tmp_path / sub, adapter_name=saved_as[name], share_prompt=False)
    names, ids = ["ours", "authors", "peft", "whole", "__base__"], requests([5, 9, 3, 8, 4])
    reference_names = [saved_as.get(n, n) for n in names]
    got = embedder.prompts(ids, names)
    assert_prompts_equal(got, PromptEmbedder.from_model(reference).prompts(ids, reference_names))
    assert_prompts_equal(got, [hf_inputs_embeds(reference, i, n) for i, n in zip(ids, reference_names)])


def test_only_the_embedding_shard_is_opened(tmp_path, monkeypatch):
    from dept_fast.checkpoint import files

    tiny_llama().save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    opened = []
    safe_open = files.safe_open
    monkeypatch.setattr(files, "safe_open", lambda file, *a, **k: opened.append(file) or safe_open(file, *a, **k))
    module, model = load_input_embeddings(tmp_path, dtype=torch.float16)
    assert {str(tmp_path / index["model.embed_tokens.weight"])} == set(opened)
    assert all(p.is_meta for p in model.model.layers.parameters())
    assert module.weight.dtype == torch.float16 and not module.weight.requires_grad
    assert torch.equal(module.weight, tiny_llama().get_input_embeddings().weight.half())


def test_a_bare_base_model_save(tmp_path):
    """A save of LlamaModel (keys without the "model." prefix) is read too."""
    tiny_llama().model.save_pretrained(tmp_path)
    module, _ = load_input_embeddings(tmp_path)
    assert torch.equal(module.weight, tiny_llama().get_input_embeddings().weight)


def test_models_that_scale_their_embeddings(tmp_path):
    """Gemma scales E[ids] by sqrt(d) inside its embedding module; vLLM feeds prompt_embeds to the
    layers as they are (its Gemma scales only in embed_input_ids), so the prompts must be the scaled
    inputs the HF model builds: from the model and from the checkpoints; an adapter built by hand with
    another scale is refused."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
    model.save_pretrained(tmp_path / "base")
    module, _ = load_input_embeddings(tmp_path / "base")  # the scale is a buffer no file holds
    ids = torch.arange(VOCAB)
    assert torch.allclose(module(ids), model.get_input_embeddings()(ids)) and not torch.equal(module(ids),
                                                                                               module.weight)
    apply_dept(model, 3, 2, 16, share_prompt=False)
    with torch.no_grad():
        model.dept.lora_B.normal_()
    want = [hf_inputs_embeds(model, [5, 6, 7], "default")]
    assert_prompts_equal(PromptEmbedder.from_model(model).prompts([[5, 6, 7]], ["default"]), want)
    model.dept.save_pretrained(tmp_path / "adapter")
    loaded = PromptEmbedder.from_pretrained(tmp_path / "base", {"a": tmp_path / "adapter"}, device="cpu")
    assert_prompts_equal(loaded.prompts([[5, 6, 7]], ["a"]), want)
    unscaled = FusedDePTEmbedding(model.get_input_embeddings(), 3, 2, 16, embed_scale=1.0)
    with pytest.raises(ValueError, match="multiplies its rows by 5.65685 in its forward, but adapter 'x' adds its "
                                         "update to 1 x E"):
        PromptEmbedder(model.get_input_embeddings(), {"x": unscaled})


def test_refusals_name_the_problem(tmp_path):
    model = served_model()
    embedder = PromptEmbedder.from_model(model)
    cases = [
        (([[1, 2]], ["nope"]), ValueError, r"unknown adapter name\(s\) \['nope'\]"),
        (([[1, 2]], ["dept", "pt"]), ValueError, "2 names for 1 requests"),
        (([[1, 2]], "dept"), TypeError, "one per request"),
        (([[1, VOCAB]], ["dept"]), ValueError, rf"request 0: token ids must lie in \[0, {VOCAB}\).*{VOCAB}"),
        (([[3], [-1]], ["dept", "__base__"]), ValueError, "request 1: token ids .* found -1"),
        (([[1] * 13], ["small"]), ValueError, "request 0 has 13 tokens; adapter 'small' covers max_length=12"),
        (([[]], ["dept"]), ValueError, "request 0 has no tokens"),
        ((torch.tensor([1, 2]), ["dept"]), ValueError, "must be 2-D"),
        (([[1.0, 2.0]], ["dept"]), TypeError, "request 0: token ids must be a list of ints"),
        (([torch.tensor([1.0])], ["dept"]), ValueError, "1-D integer tensor"),
    ]
    for (ids, names), error, message in cases:
        with pytest.raises(error, match=message):
            embedder.prompts(ids, names)
    apply_prefix_tuning(model, 2, projection_dim=None, adapter_name="prefix")
    with pytest.raises(ValueError, match="'prefix' names a Prefix-Tuning adapter.*prompt_embeds"):
        PromptEmbedder.from_model(model).prompts([[1]], ["prefix"])
    with pytest.raises(ValueError, match="encoder-decoder"):
        PromptEmbedder.from_model(apply_dept(tiny_t5(), 2, 2, 8))
    tiny_t5().save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="encoder-decoder"):
        load_input_embeddings(tmp_path / "t5")
    with pytest.raises(FileNotFoundError, match="not a saved transformers model"):
        load_input_embeddings(tmp_path / "missing")


def test_completions_encoding_is_what_vllm_decodes():
    """vLLM's server: pybase64.b64decode(validate=True), then torch.load(weights_only=True); a view's
    whole storage is not sent."""
    model = served_model()
    prompts = PromptEmbedder.from_model(model).prompts(requests(), NAMES)
    one = prompts[1]["prompt_embeds"]
    payload = base64.b64decode(encode_prompt_embeds(one), validate=True)
    back = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    assert torch.equal(back, one)
    assert len(payload) < one.numel() * one.element_size() + 2048
    with pytest.raises(ValueError, match="2-D"):
        encode_prompt_embeds(one[0])
