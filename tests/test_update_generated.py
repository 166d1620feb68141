"""``update_generated=False`` (apply_dept / load_dept): the DePT authors' generation semantics, which
vLLM's also are — the low-rank update covers the input tokens, generated tokens enter as E[token].

Reference: greedy decoding by full uncached forwards of the plain model (``"__base__"``) on
hand-built inputs_embeds, ``[P ; E[ids] + scaling * (A @ B)[:L] ; E[generated]]``, one row alone
(unpadded). generate() runs a left-padded mixed batch through the cache, on both prompt routes;
fp32, summation-order noise only, so the tokens are equal and the step logits agree to
tests/numerics.py's fp32 tolerance.
"""
import pytest
import torch

from dept_fast import apply_dept, load_dept
from dept_models import ROUTES
from families import DECODERS, build
from numerics import TOL, rel_err
from tiny_models import VOCAB

STEPS = 5
ADAPTERS = {"dept": (3, 4, 16), "pt": (5, 0, 16), "small": (2, 2, 8)}
"""name -> (m, r, max_length); "small": its generated tokens run past max_length (8)."""


def authors_model(family, share, update_generated=False, seed=0):
    torch.manual_seed(seed)
    model = build(family, dropout=False)
    for name, (m, r, s) in ADAPTERS.items():
        apply_dept(model, m, r, s, lora_alpha=5.0, share_prompt=share, adapter_name=name,
                   update_generated=update_generated)
    with torch.no_grad():
        for p in model.dept_adapters.parameters():
            if p.requires_grad:
                p.normal_()
    model.generation_config.eos_token_id = None
    return model.eval()


def authors_decode(model, ids, name):
    """(tokens (STEPS,), logits (STEPS, V)) of one unpadded row, decoded the DePT authors' way."""
    embed = model.get_input_embeddings()
    with torch.no_grad():
        inputs = model.dept_adapters[name](ids[None]) if name != "__base__" else embed(ids[None])
        tokens, logits = [], []
        for _ in range(STEPS):
            scores = model(inputs_embeds=inputs, adapter_names=["__base__"], use_cache=False).logits[0, -1]
            token = scores.argmax()
            tokens.append(token)
            logits.append(scores)
            inputs = torch.cat([inputs, embed(token.view(1, 1))], 1)
    return torch.stack(tokens), torch.stack(logits)


def left_padded(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=gen)
    mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def generate(model, ids, mask, names):
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=STEPS,
                         min_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -STEPS:], torch.stack(out.logits, 1)


@ROUTES
@pytest.mark.parametrize("family", DECODERS)
def test_generate_follows_the_authors(family, share):
    model = authors_model(family, share)
    names = ["dept", "small", "__base__", "pt", "dept"]
    lengths = [6, 7, 4, 5, 3]  # "small": 7 inputs + 5 generated reach positions 7..11, past its max_length 8
    ids, mask = left_padded(lengths)
    tokens, logits = generate(model, ids, mask, names)
    for i, name in enumerate(names):
        want_tokens, want_logits = authors_decode(model, ids[i, -lengths[i]:], name)
        assert torch.equal(tokens[i], want_tokens), (i, name)
        assert rel_err(logits[i].float(), want_logits) <= TOL[torch.float32]


@ROUTES
def test_each_row_follows_its_adapter(share):
    """update_generated is the adapter's (settable) attribute: in one batch a row whose adapter keeps
    the default takes the update on generated tokens (as generating it alone with the default does)."""
    model = authors_model("llama-gqa", share)
    model.dept_adapters["dept"].update_generated = True
    names, lengths = ["dept", "pt", "small"], [6, 5, 4]
    ids, mask = left_padded(lengths)
    tokens, _ = generate(model, ids, mask, names)
    updated = authors_model("llama-gqa", share, update_generated=True)
    alone, _ = generate(updated, ids[:1, -6:], mask[:1, -6:], ["dept"])
    assert torch.equal(tokens[0], alone[0])
    for i in (1, 2):
        assert torch.equal(tokens[i], authors_decode(model, ids[i, -lengths[i]:], names[i])[0])
    assert not torch.equal(alone[0], authors_decode(model, ids[0, -6:], "dept")[0])  # the mode matters here


def test_default_updates_generated_tokens_and_keeps_its_limit():
    """update_generated=True (the default): generated tokens need update rows, so "small" (max_length 8)
    cannot generate past position 7."""
    model = authors_model("llama-gqa", None, update_generated=True)
    assert all(a.update_generated for a in model.dept_adapters.values())
    ids, mask = left_padded([7])
    with pytest.raises(ValueError, match="max_length"):
        generate(model, ids, mask, ["small"])


def test_load_dept_takes_it_and_checks_it(tmp_path):
    model = authors_model("gpt2", None)
    model.dept_adapters["dept"].save_pretrained(tmp_path)
    assert load_dept(build("gpt2"), tmp_path, update_generated=False).dept.update_generated is False
    assert load_dept(build("gpt2"), tmp_path).dept.update_generated is True
    with pytest.raises(TypeError, match="update_generated must be True or False"):
        apply_dept(build("gpt2"), 2, 2, 8, update_generated=None)
