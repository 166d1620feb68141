"""PEFT's encoder-decoder PrefixTuning checkpoints (task_type SEQ_2_SEQ_LM) loaded by ours, against PEFT.

PEFT puts an encoder-decoder's prefix in the decoder's self-attention cache only (the cross-attention
part of its cache is replaced by an empty one), decoder layer i taking saved layer (2i mod layers)'s
rows; the decoder's tokens sit after the prefix (BART: positions p + i; T5: the relative bias of keys
0..p-1 for queries at p + i). ``load_prefix_tuning`` reads such a checkpoint as a "decoder" prefix of
the "cache" position convention: logits, loss and greedy generation agree with PEFT's to fp32
rounding, padded encoder inputs and decoder masks included; what cannot be represented is refused.
"""
import json

import pytest
import torch

from dept_fast import apply_prefix_tuning, load_prefix_tuning
from dept_fast.compat import enable_activation_checkpointing
from families import build
from numerics import model_tol, rel_err

peft = pytest.importorskip("peft")  # a test extra; machines without it skip this module
P = 3
FAMILIES = ["t5", "bart"]
POSITIONED = ["t5", "bart", "mbart", "pegasus", "marian"]
"""The encoder-decoders of the family matrix whose decoder places tokens after a cached prefix in a
way ours can follow: T5's relative bias, the others' positions module that takes position_ids."""


def make_peft(family, prefix_len=P, projection=False, seed=1, **overrides):
    """PEFT's seq2seq prefix on the family's tiny model, its prompt encoder drawn afresh (never zeros)."""
    config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=prefix_len,
                                     prefix_projection=projection, encoder_hidden_size=16)
    model = peft.get_peft_model(build(family, dropout=False, **overrides), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.prompt_encoder.default.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def ours_from(peft_model, family, path, name="default", model=None, **overrides):
    peft_model.save_pretrained(path)
    return load_prefix_tuning(model if model is not None else build(family, dropout=False, **overrides), path,
                              adapter_name=name)


def inputs(rows=3, length=7, target=5, seed=0):
    """Encoder ids with right- and left-padded rows, and decoder labels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[-1, :2] = 0
    labels = torch.randint(3, 97, (rows, target), generator=generator)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def tol(model, batch):
    return model_tol(model, P + batch["input_ids"].shape[1])


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("family", POSITIONED)
def test_logits_and_loss_match_peft(family, layers, tmp_path):
    """3 layers: decoder layers 0, 1, 2 take saved layers 0, 2, 1 (PEFT's cache construction)."""
    sizes = dict(num_layers=layers, num_decoder_layers=layers) if family == "t5" else dict(
        encoder_layers=layers, decoder_layers=layers)
    peft_model = make_peft(family, **sizes)
    ours = ours_from(peft_model, family, tmp_path, **sizes)
    assert ours.prefix_tuning.positions == "cache" and set(ours.prefix_tuning.encoders) == {"decoder"}
    batch = inputs()
    expected, got = peft_model(**batch), ours(**batch)
    plain = build(family, dropout=False, **sizes)(**batch)
    assert rel_err(plain.logits, expected.logits) > 1e-2  # the prefix matters
    assert rel_err(got.logits, expected.logits) <= tol(ours, batch)
    assert abs(got.loss.item() - expected.loss.item()) <= tol(ours, batch) * expected.loss.item()
    expected.loss.backward()
    got.loss.backward()
    encoder = ours.prefix_tuning.encoders["decoder"]
    got_saved, expected_saved = in_saved_layout(encoder), peft_prefix_grad(peft_model, encoder)
    assert rel_err(got_saved, expected_saved) <= model_tol(ours, P + batch["input_ids"].shape[1], backward=True)


def in_saved_layout(encoder):
    """Our prefix gradient (decoder layers, 2, kv_heads, p, head_dim) summed into PEFT's saved layers:
    decoder layer i takes saved layer 2i mod layers."""
    layers, grad = encoder.num_layers, encoder.prefix.grad
    saved = torch.zeros_like(grad)
    for i in range(layers):
        saved[2 * i % layers] += grad[i]
    return saved


def peft_prefix_grad(peft_model, encoder):
    """PEFT's prompt_embeddings gradient as (saved layers, 2, kv_heads, p, head_dim)."""
    grad = peft_model.prompt_encoder.default.embedding.weight.grad
    return grad.view(P, encoder.num_layers, 2, encoder.num_kv_heads, encoder.head_dim).permute(1, 2, 3, 0, 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_attention_mask_matches_peft(family, tmp_path):
    """PEFT prepends p ones to a given decoder_attention_mask; ours joins p attended prefix columns."""
    peft_model = make_peft(family)
    ours = ours_from(peft_model, family, tmp_path)
    batch = inputs()
    decoder_mask = torch.ones_like(batch["labels"])
    decoder_mask[0, 3:] = 0
    batch["decoder_attention_mask"] = decoder_mask
    expected, got = peft_model(**batch), ours(**batch)
    assert rel_err(got.logits, expected.logits) <= tol(ours, batch)


def test_eager_attention_matches_peft(tmp_path):
    peft_model = make_peft("t5", attn_implementation="eager")
    ours = ours_from(peft_model, "t5", tmp_path, attn_implementation="eager")
    batch = inputs()
    assert rel_err(ours(**batch).logits, peft_model(**batch).logits) <= tol(ours, batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_reads_peft_checkpoint_saved_with_projection(family, tmp_path):
    """PEFT evaluates its MLP when saving: the checkpoint holds the prefixes, loaded merged."""
    peft_model = make_peft(family, projection=True)
    ours = ours_from(peft_model, family, tmp_path)
    assert ours.prefix_tuning.encoders["decoder"].merged
    batch = inputs()
    assert rel_err(ours(**batch).logits, peft_model(**batch).logits) <= tol(ours, batch)


def peft_greedy(peft_model, batch, steps):
    """Greedy decoding by PEFT's forward without a cache, and each step's logits (PEFT's generate()
    loses its prefix under transformers >= 5.24, which renamed ``past_key_values`` to ``cache``)."""
    decoder = torch.full((batch["input_ids"].shape[0], 1), peft_model.config.decoder_start_token_id)
    scores = []
    for _ in range(steps):
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            decoder_input_ids=decoder).logits[:, -1]
        scores.append(logits)
        decoder = torch.cat([decoder, logits.argmax(-1, keepdim=True)], 1)
    return decoder, torch.stack(scores, 1)


@pytest.mark.parametrize("family", POSITIONED)
def test_greedy_generate_matches_peft(family, tmp_path):
    peft_model = make_peft(family)
    ours = ours_from(peft_model, family, tmp_path)
    batch = inputs()
    steps = 6
    out = ours.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=steps,
                        min_new_tokens=steps, eos_token_id=None, do_sample=False, output_logits=True,
                        return_dict_in_generate=True)
    tokens, scores = peft_greedy(peft_model, batch, steps)
    assert torch.equal(out.sequences, tokens)
    assert rel_err(torch.stack(out.logits, 1), scores) <= tol(ours, batch)


MIXED = {"t5": ((3, 2), ["a", "b", "__base__"]), "bart": ((3, 3), ["a", "b", "a"])}
"""Per family, the prefix lengths of adapters "a" and "b" and the rows' adapters a mixed batch can take:
T5 places each row's prefix by its own p (per-row bias columns); a BART-family decoder gives the whole
batch one row of positions, so its rows must share p (see test_refuses_a_batch_of_positions_per_row)."""


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch(family, tmp_path):
    """Adapters of the 'cache' convention in one batch: each row as alone."""
    (p_a, p_b), names = MIXED[family]
    model = build(family, dropout=False)
    ours_from(make_peft(family, prefix_len=p_a, seed=1), family, tmp_path / "a", "a", model)
    ours_from(make_peft(family, prefix_len=p_b, seed=2), family, tmp_path / "b", "b", model)
    batch = inputs()
    mixed = model(**batch, adapter_names=names).logits
    for row, name in enumerate(names):
        alone = model(**{k: v[row:row + 1] for k, v in batch.items()}, adapter_names=[name]).logits
        assert rel_err(mixed[row:row + 1], alone) <= tol(model, batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_our_format_round_trip_is_bit_exact(family, tmp_path):
    ours = ours_from(make_peft(family), family, tmp_path / "peft")
    ours.prefix_tuning.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "dept_prefix_config.json").read_text())["positions"] == "cache"
    again = load_prefix_tuning(build(family, dropout=False), tmp_path / "ours")
    assert again.prefix_tuning.positions == "cache"
    batch = inputs()
    assert torch.equal(again(**batch).logits, ours(**batch).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_save_round_trip_is_bit_exact(family, tmp_path):
    ours = ours_from(make_peft(family), family, tmp_path / "peft")
    ours.save_pretrained(tmp_path / "model")
    again = load_prefix_tuning(build(family, dropout=False), tmp_path / "model")
    assert again.prefix_tuning.positions == "cache"
    batch = inputs()
    assert torch.equal(again(**batch).logits, ours(**batch).logits)


def test_own_convention_records_no_positions(tmp_path):
    """An adapter of the model's own convention writes the config as before (no 'positions' key), and
    a config without it loads with the model's own convention."""
    model = apply_prefix_tuning(build("t5", dropout=False), P, projection_dim=None)
    model.prefix_tuning.save_pretrained(tmp_path)
    assert "positions" not in json.loads((tmp_path / "dept_prefix_config.json").read_text())
    assert load_prefix_tuning(build("t5", dropout=False), tmp_path).prefix_tuning.positions is None


# ---------------------------------------------------------------------------------------------
# Refusals

@pytest.mark.parametrize("saved, model", [(dict(num_layers=3, num_decoder_layers=3), {}),
                                          # PEFT counts the encoder's layers (num_hidden_layers)
                                          (dict(num_layers=3, num_decoder_layers=2), dict(num_layers=3))])
def test_refuses_a_checkpoint_of_other_layers(saved, model, tmp_path):
    make_peft("t5", **saved).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"decoder prefixes \(layers, kv_heads, head_dim\) = \(3, 4, 10\) in the "
                                         r"checkpoint, \(2, 4, 10\) in the model"):
        load_prefix_tuning(build("t5", dropout=False, **model), tmp_path)


def test_refuses_a_checkpoint_of_other_heads(tmp_path):
    make_peft("t5", num_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\(2, 2, 20\) in the checkpoint, \(2, 4, 10\) in the model"):
        load_prefix_tuning(build("t5", dropout=False), tmp_path)


def test_refuses_a_causal_checkpoint_on_an_encoder_decoder(tmp_path):
    make_peft("t5").save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(num_transformer_submodules=1, task_type="CAUSAL_LM")
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"num_transformer_submodules 1 \(task_type 'CAUSAL_LM'\) is not what PEFT "
                                         r"gives an encoder-decoder"):
        load_prefix_tuning(build("t5", dropout=False), tmp_path)


def test_refuses_an_encoder_decoder_checkpoint_on_a_causal_decoder(tmp_path):
    make_peft("t5").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_transformer_submodules 2 \(task_type 'SEQ_2_SEQ_LM'\) is not what "
                                         r"PEFT gives a causal decoder"):
        load_prefix_tuning(build("gpt2", dropout=False), tmp_path)


def _edit_our_config(path, **changes):
    """Our checkpoint with its config changed in both copies (the json and the safetensors header)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((path / "dept_prefix_config.json").read_text())
    config.update(changes)
    (path / "dept_prefix_config.json").write_text(json.dumps(config))
    weights = path / "dept_prefix.safetensors"
    save_file(load_file(weights), weights, metadata={"config": json.dumps(config)})


def test_refuses_an_unknown_position_convention(tmp_path):
    ours = ours_from(make_peft("t5"), "t5", tmp_path / "peft")
    ours.prefix_tuning.save_pretrained(tmp_path / "ours")
    _edit_our_config(tmp_path / "ours", positions="rotary")
    with pytest.raises(ValueError, match=r"key 'positions' must be one of \('cache',\) or absent, got 'rotary'"):
        load_prefix_tuning(build("t5", dropout=False), tmp_path / "ours")


def test_refuses_cache_positions_beyond_the_decoder(tmp_path):
    model = apply_prefix_tuning(build("t5", dropout=False), P, projection_dim=None, attentions=("decoder", "cross"))
    model.prefix_tuning.save_pretrained(tmp_path)
    _edit_our_config(tmp_path, positions="cache")
    with pytest.raises(ValueError, match=r"has prefixes on \['cross', 'decoder'\] with the 'cache' position "
                                         r"convention, which places a prefix on the decoder's self-attention only"):
        load_prefix_tuning(build("t5", dropout=False), tmp_path)


def test_refuses_a_batch_mixing_position_conventions(tmp_path):
    model = apply_prefix_tuning(build("t5", dropout=False), P, projection_dim=None, adapter_name="own")
    ours_from(make_peft("t5"), "t5", tmp_path, "peft", model)
    batch = inputs(rows=2)
    with pytest.raises(ValueError, match=r"prefix adapters of different position conventions \{'own': None, "
                                         r"'peft': 'cache'\}"):
        model(**batch, adapter_names=["own", "peft"])


def test_self_check_compares_with_peft_cache_route(monkeypatch, tmp_path):
    """The attach's self-check runs the plain model with the probe prefixes in PEFT's pre-filled
    EncoderDecoderCache: prefix columns without their position bias are refused, the model left as it was."""
    from dept_fast.hf import attention
    from dept_fast.hf.verify import Refused

    make_peft("t5").save_pretrained(tmp_path)
    monkeypatch.setattr(attention, "join_position_bias",
                        lambda module, prefix, bias, q_len, n_prefix: torch.nn.functional.pad(bias, (n_prefix, 0)))
    model = build("t5", dropout=False)
    with pytest.raises(Refused, match=r"do not give the logits of the plain model with them in a pre-filled cache"):
        load_prefix_tuning(model, tmp_path)
    assert not hasattr(model, "prefix_tuning")


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_keeps_the_prefix(family, tmp_path):
    """PEFT refuses activation checkpointing with prefixes; ours keeps them (the bias columns shared by
    the layers included): the same loss and gradient (to rounding) in training with and without it."""
    peft_model = make_peft(family)
    peft_model.save_pretrained(tmp_path)
    batch = inputs()
    results = []
    for checkpointing in (False, True):
        model = load_prefix_tuning(build(family, dropout=False), tmp_path).train()
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=False)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), model.prefix_tuning.encoders["decoder"].prefix.grad))
    (loss, grad), (loss_checkpointed, grad_checkpointed) = results
    assert torch.equal(loss, loss_checkpointed)  # the recomputation sums the gradient in another order
    assert rel_err(grad_checkpointed, grad) <= model_tol(model, P + batch["input_ids"].shape[1], backward=True)


@pytest.mark.parametrize("names, lengths", [(["a", "b"], r"\[2, 3\]"),
                                            (["a", "__base__"], r"\[3\] and plain rows \(none\)")])
def test_refuses_a_batch_of_positions_per_row(names, lengths, tmp_path):
    """BART's decoder gives the whole batch one row of positions: rows of different prefix lengths
    (a plain row's is 0) under the 'cache' convention cannot be placed, so the batch is refused."""
    model = build("bart", dropout=False)
    ours_from(make_peft("bart", prefix_len=3), "bart", tmp_path / "a", "a", model)
    ours_from(make_peft("bart", prefix_len=2), "bart", tmp_path / "b", "b", model)
    with pytest.raises(ValueError, match=rf"rows have decoder prefixes of lengths {lengths} under the 'cache' "
                                         r"position convention"):
        model(**inputs(rows=2), adapter_names=names)


def test_refuses_a_decoder_whose_positions_cannot_move(tmp_path):
    """M2M100's decoder computes its positions from the ids and the cache's length inside a module that
    takes no position_ids: its tokens cannot be placed after the prefix, so the attach is refused."""
    make_peft("m2m100").save_pretrained(tmp_path)
    model = build("m2m100", dropout=False)
    with pytest.raises(ValueError, match=r"no submodule of M2M100Decoder outside its attention layers takes "
                                         r"position_ids, so its tokens cannot be placed after the prefix"):
        load_prefix_tuning(model, tmp_path)
    assert not hasattr(model, "prefix_tuning")
