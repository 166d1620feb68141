"""Mixed-task batches: several named DePT / prompt-tuning / Prefix-Tuning adapters on one model, one
adapter per row (``adapter_names``), against each row run alone with its adapter.

Every row's logits (real positions), loss term and gradient contribution must equal the row's own
single-adapter call (fp32, summation order only: within tests/numerics.py's bound for the family matrix); its
generate() tokens likewise (greedy; seeded sampling against a decoding loop that draws the batch
from the rows' single-adapter distributions). Adapters differ in m, r, max_length and lora_alpha;
"__base__" rows give the plain model's numbers.
"""
import pytest
import torch

from dept_fast import (active_adapter, apply_dept, apply_prefix_tuning, enable_activation_checkpointing, load_dept,
                       set_adapter)
from dept_fast.ops import dept_embedding_mixed, dept_embedding_reference
from dept_models import FAMILY_ROUTES, randomized
from families import ENCODER_DECODERS, FAMILIES, build
from numerics import rel_err, suite_tol
from tiny_models import VOCAB

TOL = suite_tol(FAMILIES)
NAMES = ["dept", "pt", "__base__", "prefix", "dept", "small"]


def mixed_model(family, share, seed=0):
    """Four adapters of different sizes: DePT (m 3, r 4, s 16), prompt tuning (m 5), DePT (m 2, r 2,
    s 12, alpha 3) and Prefix-Tuning (p 4) — the last two under names of their own."""
    torch.manual_seed(seed)
    model = build(family, dropout=False)
    apply_dept(model, 3, 4, 16, share_prompt=share, adapter_name="dept")
    apply_dept(model, 5, 0, 16, adapter_name="pt")
    apply_dept(model, 2, 2, 12, lora_alpha=3.0, adapter_name="small")
    apply_prefix_tuning(model, 4, projection_dim=None, adapter_name="prefix")
    randomized(model, seed)
    model.generation_config.eos_token_id = None
    return model.eval()


def batch(family, rows=len(NAMES), length=7, seed=1):
    """Rows 1 and 3 left-padded: decoders' positions count real tokens, and T5's encoder has each row's
    prompt just before its first real token, so a padded row equals the row alone."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[3, :1] = 0
    if family in ENCODER_DECODERS:
        extra = {"decoder_input_ids": torch.randint(3, VOCAB, (rows, 4), generator=gen)}
        labels = extra["decoder_input_ids"].clone()
    else:
        extra = {}
        labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, labels=labels, **extra)


def row_alone(inputs, i):
    """Row i of a batch without its padding."""
    keep = inputs["attention_mask"][i].bool()
    row = {key: value[i:i + 1] for key, value in inputs.items()}
    for key in ("input_ids", "attention_mask") + (("labels",) if "decoder_input_ids" not in inputs else ()):
        if key in row:
            row[key] = row[key][:, keep]
    return row


def real_positions(model, logits, inputs, i, name):
    """Row i's logits at its real positions: its tokens, and (prompt in every row) its prompt's slots,
    which come last among the longest prompt's M (T5: every decoder position)."""
    if model.config.is_encoder_decoder:
        return logits[i]
    real = inputs["attention_mask"][i].bool()
    slots = logits.shape[1] - real.shape[0]
    if slots:
        adapters = model.dept_adapters
        m = adapters[name].num_prompt_tokens if name in adapters else 0
        real = torch.cat([torch.arange(slots) >= slots - m, real])
    return logits[i][real]


def summed_loss(model, inputs, names):
    """The loss as a sum over target tokens (so rows add up), and the logits."""
    out = model(**inputs, adapter_names=names, num_items_in_batch=torch.tensor(1))
    if model.config.is_encoder_decoder:  # T5 averages with its own CrossEntropyLoss
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs["labels"].flatten(), reduction="sum")
        return loss, logits
    return out.loss, out.logits


def grads(model):
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()
            if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@FAMILY_ROUTES
def test_each_row_equals_the_row_alone(family, share, checkpointing):
    model = mixed_model(family, share).train()
    if checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)
    inputs = batch(family)
    loss, logits = summed_loss(model, inputs, NAMES)
    loss.backward()
    mixed_grads = grads(model)

    total, want_grads = 0.0, {n: torch.zeros_like(g) for n, g in mixed_grads.items()}
    for i, name in enumerate(NAMES):
        model.zero_grad()
        row = row_alone(inputs, i)
        row_loss, row_logits = summed_loss(model, row, [name])
        if name != "__base__":  # the plain model has nothing to train
            row_loss.backward()
        total += row_loss.item()
        for n, g in grads(model).items():
            want_grads[n] += g
        assert rel_err(real_positions(model, logits, inputs, i, name), row_logits[0]) <= TOL, name
    assert abs(loss.item() - total) <= TOL * total
    for n, g in mixed_grads.items():
        assert rel_err(g, want_grads[n]) <= TOL, n
    trained = {n for n, g in mixed_grads.items() if g.abs().sum() > 0}
    assert any(".dept." in n for n in trained) and any(".prefix." in n for n in trained)  # every kind trained
    assert any(".small." in n for n in trained) and any(".pt." in n for n in trained)


def test_base_rows_are_the_plain_model():
    model = mixed_model("llama-gqa", None)
    inputs = {k: v for k, v in batch("llama-gqa").items() if k != "labels"}
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=NAMES).logits
        plain = build("llama-gqa")(**{k: v[2:3] for k, v in inputs.items()}).logits
    assert rel_err(mixed[2:3], plain) <= TOL


@FAMILY_ROUTES
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_greedy_generate_gives_each_rows_own_tokens(family, share, padded):
    """Left-padded rows, and an unpadded batch (generate() then drops the all-ones mask: the cached
    steps' mask must still cover every row's prompt slots and cached tokens)."""
    model = mixed_model(family, share)
    inputs = {k: v for k, v in batch(family).items() if k in ("input_ids", "attention_mask")}
    if not padded:
        inputs = {"input_ids": inputs["input_ids"], "attention_mask": torch.ones_like(inputs["input_ids"])}
    with torch.no_grad():
        mixed = model.generate(**inputs, adapter_names=NAMES, max_new_tokens=5, do_sample=False)
        for i, name in enumerate(NAMES):
            alone = model.generate(**row_alone(inputs, i), adapter_names=[name], max_new_tokens=5, do_sample=False)
            assert torch.equal(mixed[i, -5:], alone[0, -5:]), name


@pytest.mark.parametrize("family, share", [("gpt2", None), ("llama-gqa", False), ("t5", None)],
                         ids=["gpt2-shared", "llama-gqa-every-row", "t5"])
def test_seeded_sampling_draws_from_each_rows_own_distribution(family, share):
    """generate(do_sample) with a seed against a loop that, at every step, takes each row's
    next-token distribution from the row alone (uncached, its adapter) and draws the batch with the
    same seed: the same tokens (a wrong row distribution would change the draws)."""
    model = mixed_model(family, share)
    inputs = {k: v for k, v in batch(family).items() if k in ("input_ids", "attention_mask")}
    steps = 4
    with torch.no_grad():
        torch.manual_seed(7)
        mixed = model.generate(**inputs, adapter_names=NAMES, max_new_tokens=steps, do_sample=True, top_k=0,
                               top_p=1.0, temperature=1.0)[:, -steps:]
        torch.manual_seed(7)
        rows = [row_alone(inputs, i) for i in range(len(NAMES))]
        drawn = torch.zeros(len(NAMES), 0, dtype=torch.long)
        for _ in range(steps):
            scores = torch.cat([_next_token_logits(model, row, name, drawn[i:i + 1])
                                for i, (row, name) in enumerate(zip(rows, NAMES))])
            drawn = torch.cat([drawn, scores.softmax(-1).multinomial(1)], 1)
    assert torch.equal(mixed, drawn)


def _next_token_logits(model, row, name, generated):
    if model.config.is_encoder_decoder:
        start = torch.full((1, 1), model.config.decoder_start_token_id)
        decoder = torch.cat([start, generated], 1)
        return model(**row, decoder_input_ids=decoder, adapter_names=[name], use_cache=False).logits[:, -1].float()
    ids = torch.cat([row["input_ids"], generated], 1)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[name],
                 use_cache=False).logits[:, -1].float()


def test_active_adapter_and_names():
    model = mixed_model("gpt2", None)
    assert active_adapter(model) == "dept" and model.dept is model.dept_adapters["dept"]
    assert not hasattr(model, "prefix_tuning")  # the active name has no prefixes
    inputs = {k: v for k, v in batch("gpt2").items() if k != "labels"}
    with torch.no_grad():
        uniform = model(**inputs).logits
        assert torch.equal(uniform, model(**inputs, adapter_names=["dept"] * len(NAMES)).logits)
        set_adapter(model, "prefix")
        assert model.prefix_tuning is model.prefix_adapters["prefix"] and not hasattr(model, "dept")
        assert rel_err(model(**inputs).logits, model(**inputs, adapter_names=["prefix"] * len(NAMES)).logits) <= TOL
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) \['nope'\]"):
        model(**inputs, adapter_names=["dept"] * 5 + ["nope"])
    with pytest.raises(ValueError, match="adapter_names has 2 names for a batch of 6 rows"):
        model(**inputs, adapter_names=["dept", "pt"])
    with pytest.raises(ValueError, match="has no adapter named 'nope'"):
        set_adapter(model, "nope")
    with pytest.raises(ValueError, match="already has a DePT adapter named 'dept'"):
        apply_dept(model, 2, 2, 8, adapter_name="dept")
    with pytest.raises(ValueError, match="adapter_name must be"):
        apply_dept(model, 2, 2, 8, adapter_name="__base__")
    with pytest.raises(ValueError, match="all DePT adapters of a model take one route"):
        apply_dept(model, 2, 2, 8, share_prompt=False, adapter_name="other")


def test_adapters_save_and_load_on_their_own(tmp_path):
    model = mixed_model("llama-gqa", None)
    inputs = {k: v for k, v in batch("llama-gqa").items() if k != "labels"}
    for name in ("dept", "small"):
        model.dept_adapters[name].save_pretrained(tmp_path / name)
    model.prefix_adapters["prefix"].save_pretrained(tmp_path / "prefix")
    fresh = build("llama-gqa")
    for name in ("small", "dept"):
        load_dept(fresh, tmp_path / name, adapter_name=name)
    from dept_fast import load_prefix_tuning
    load_prefix_tuning(fresh, tmp_path / "prefix", adapter_name="prefix")
    names = ["dept", "small", "prefix", "__base__", "small", "dept"]
    with torch.no_grad():
        assert rel_err(fresh(**inputs, adapter_names=names).logits, model(**inputs, adapter_names=names).logits) <= TOL


@pytest.mark.parametrize("positions", [False, True], ids=["columns", "positions"])
def test_mixed_op_equals_each_row_alone(positions, device, poison):
    """The op on its own: every row's [0 ; P_a ; E[ids] + s_a (A_a B_a)[pos]] and every gradient."""
    gen = torch.Generator().manual_seed(3)
    vocab, dim = 50, 40
    sizes = [(3, 4, 16, 8.0), (5, 0, 12, 8.0), (1, 2, 9, 3.0)]  # (m, r, s, lora_alpha)
    weight = torch.randn(vocab, dim, generator=gen).to(device).requires_grad_()
    adapters = [[torch.randn(*shape, generator=gen).to(device).requires_grad_() for shape in ((m, dim), (s, r), (r, dim))]
                for m, r, s, _ in sizes]
    scalings = [alpha / r ** 0.5 if r else 0.0 for _, r, _, alpha in sizes]
    ids = torch.randint(0, vocab, (5, 7), generator=gen).to(device)
    index = torch.tensor([2, 0, -1, 1, 0], device=device)
    pos = torch.randint(0, 9, (5, 7), generator=gen).to(device) if positions else None
    out = dept_embedding_mixed(ids, index, weight, *(list(t) for t in zip(*adapters)), scalings, positions=pos)
    grad = torch.randn(out.shape, generator=gen).to(device)
    (out * grad).sum().backward()
    got = [weight.grad] + [t.grad for a in adapters for t in a]
    for t in [weight] + [t for a in adapters for t in a]:
        t.grad = None
    longest = max(m for m, *_ in sizes)
    for i, a in enumerate(index.tolist()):
        prompt, lora_A, lora_B = adapters[a] if a >= 0 else (weight[:0], weight.new_zeros(16, 0),
                                                             weight.new_zeros(0, dim))
        rows = pos[i] if positions else torch.arange(7, device=device)
        alone = dept_embedding_reference(ids[i:i + 1], weight, prompt, lora_A[rows], lora_B,
                                         scalings[a] if a >= 0 else 0.0)  # A's rows at the positions, as columns
        assert torch.all(out[i, :longest - prompt.shape[0]] == 0)
        assert rel_err(out[i, longest - prompt.shape[0]:], alone[0]) <= TOL
        (alone[0] * grad[i, longest - prompt.shape[0]:]).sum().backward()
    want = [weight.grad] + [t.grad if t.grad is not None else torch.zeros_like(t) for a in adapters for t in a]
    for g, w in zip(got, want):
        assert rel_err(g, w) <= TOL


def test_the_hf_trainer_trains_every_adapter_of_a_mixed_batch(tmp_path):
    """One optimizer step on a batch that mixes four adapters moves all of them; the names ride in
    the batch (a collator that keeps them, remove_unused_columns=False)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = mixed_model("llama-gqa", None).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    inputs = batch("llama-gqa")
    rows = [{**{k: v[i] for k, v in inputs.items()}, "adapter_names": name} for i, name in enumerate(NAMES)]

    def collate(examples):
        names = [example.pop("adapter_names") for example in examples]
        return {**default_data_collator(examples), "adapter_names": names}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=len(NAMES),
                             learning_rate=0.1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
    moved = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert moved == {"dept", "pt", "small", "prefix"}


def test_checkpoints_of_other_formats_load_as_named_adapters(tmp_path):
    """A PEFT prompt-tuning checkpoint and a DePT-authors' one, loaded under names beside ours:
    each row of a mixed batch gives its adapter's numbers."""
    peft = pytest.importorskip("peft")
    import json

    torch.manual_seed(0)
    peft_model = peft.get_peft_model(build("gpt2"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_()
    peft_model.save_pretrained(tmp_path / "peft")
    (tmp_path / "authors").mkdir()
    (tmp_path / "authors" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING_LORA", "num_virtual_tokens": 3, "r": 2, "lora_alpha": 4, "max_length": 16}))
    torch.save({"prompt_embeddings": torch.randn(3, 40), "prompt_encoder.lora_embedding_A": torch.randn(16, 2),
                "prompt_encoder.lora_embedding_B": torch.randn(2, 40)}, tmp_path / "authors" / "adapter_model.bin")
    model = mixed_model("gpt2", None)
    load_dept(model, tmp_path / "peft", adapter_name="peft", max_length=16)
    load_dept(model, tmp_path / "authors", adapter_name="authors")
    inputs = {k: v for k, v in batch("gpt2").items() if k != "labels"}
    names = ["peft", "authors", "dept", "__base__", "authors", "prefix"]
    with torch.no_grad():
        logits = model(**inputs, adapter_names=names).logits
        for i, name in enumerate(names):
            alone = model(**row_alone(inputs, i), adapter_names=[name]).logits
            assert rel_err(real_positions(model, logits, inputs, i, name), alone[0]) <= TOL, name
