"""Whole-model saves read back as adapters: ``load_dept`` / ``load_prefix_tuning`` on the HF
Trainer's ``checkpoint-N`` folders, on ``trainer.save_model()`` and on ``model.save_pretrained()``
(one file and sharded), Prefix-Tuning merged and not; the reloaded adapter gives the trained one's
tensors and logits exactly."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from dept_fast import apply_dept, apply_prefix_tuning, load_dept, load_prefix_tuning
from tiny_models import VOCAB, tiny_bart, tiny_gpt2, tiny_llama, tiny_t5

M, R, S, P = 3, 4, 16, 3
SETUPS = {  # name -> (base builder, attach, load, adapter attribute)
    "gpt2-dept": (tiny_gpt2, lambda m: apply_dept(m, M, R, S, lora_alpha=6.0), load_dept, "dept"),
    "t5-dept": (tiny_t5, lambda m: apply_dept(m, M, R, S, lora_alpha=6.0), load_dept, "dept"),
    "llama-prefix": (tiny_llama, lambda m: apply_prefix_tuning(m, P, projection_dim=8), load_prefix_tuning,
                     "prefix_tuning"),
    "bart-prefix": (tiny_bart, lambda m: apply_prefix_tuning(m, P, projection_dim=8), load_prefix_tuning,
                    "prefix_tuning"),  # encoder, decoder and cross-attention prefixes
}


class Rows(torch.utils.data.Dataset):
    """Fixed random rows: ids, a right-padded mask, labels (the ids; a short target for T5)."""

    def __init__(self, encoder_decoder: bool, rows: int = 8, length: int = 6) -> None:
        gen = torch.Generator().manual_seed(3)
        self.ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
        self.mask = torch.ones_like(self.ids)
        self.mask[::2, -2:] = 0
        self.labels = torch.randint(3, VOCAB, (rows, 4), generator=gen) if encoder_decoder else \
            self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class Snapshots(TrainerCallback):
    """The adapter's tensors at every save, by step."""

    def __init__(self, adapter: str) -> None:
        self.adapter, self.saved = adapter, {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.saved[state.global_step] = adapter_state(model, self.adapter)


def adapter_state(model, adapter):
    return {key: value.detach().clone() for key, value in getattr(model, adapter).state_dict().items()}


def assert_same_state(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def logits(model):
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, VOCAB, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    extra = {"decoder_input_ids": ids[:, :3]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask, **extra).logits


def train(model, output_dir, adapter):
    """Two Trainer steps, a checkpoint after each; returns the trainer and the adapter at each save."""
    snapshots = Snapshots(adapter)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=2, save_strategy="steps", save_steps=1,
                             per_device_train_batch_size=2, learning_rate=0.05, use_cpu=True, report_to="none",
                             logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(model.config.is_encoder_decoder),
                      callbacks=[snapshots])
    trainer.train()
    return trainer, snapshots.saved


@pytest.mark.parametrize("setup", SETUPS)
def test_trainer_checkpoints_and_save_model_reload_as_the_adapter(setup, tmp_path):
    build, attach, load, adapter = SETUPS[setup]
    model = attach(build())
    trainer, saved = train(model, tmp_path, adapter)
    assert sorted(saved) == [1, 2] and sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2"]
    assert any(not torch.equal(saved[1][k], saved[2][k]) for k in saved[1])  # the steps trained it
    for step in (1, 2):
        assert_same_state(adapter_state(load(build(), tmp_path / f"checkpoint-{step}"), adapter), saved[step])
    trainer.save_model(str(tmp_path / "final"))
    want = logits(model)
    for folder in ("checkpoint-2", "final"):
        assert torch.equal(logits(load(build(), tmp_path / folder)), want), folder


def test_merged_prefixes_saved_by_the_trainer_reload(tmp_path):
    """After merge() the recorded config still names the MLP; the reader goes by the tensors saved."""
    build, attach, load, adapter = SETUPS["llama-prefix"]
    model = attach(build())
    trainer, _ = train(model, tmp_path, adapter)
    model.prefix_tuning.merge()
    trainer.save_model(str(tmp_path / "merged"))
    loaded = load_prefix_tuning(build(), tmp_path / "merged")
    assert loaded.prefix_tuning.encoders["decoder"].merged
    assert_same_state(adapter_state(loaded, adapter), adapter_state(model, adapter))
    assert torch.equal(logits(loaded), logits(model))


def trained(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.5)
    return model


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
def test_save_pretrained_reloads_as_dept(shard, tmp_path):
    model = trained(apply_dept(tiny_gpt2(), M, R, S, lora_alpha=6.0))
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") == bool(shard)
    loaded = load_dept(tiny_gpt2(), tmp_path)
    assert loaded.dept.lora_alpha == 6.0 and loaded.dept.share_prompt
    assert_same_state(adapter_state(loaded, "dept"), adapter_state(model, "dept"))
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
def test_save_pretrained_reloads_each_stacks_form(shard, tmp_path):
    """T5 with the encoder's prefixes merged and the decoder's MLP kept, in bf16 beside fp32 weights."""
    model = trained(apply_prefix_tuning(tiny_t5(), P, projection_dim=8))
    model.prefix_tuning.encoders["encoder"].merge()
    model.prefix_tuning.to(torch.bfloat16)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    loaded = load_prefix_tuning(tiny_t5(), tmp_path)
    assert [e.merged for e in loaded.prefix_tuning.encoders.values()] == [True, False, False]
    assert_same_state(adapter_state(loaded, "prefix_tuning"), adapter_state(model, "prefix_tuning"))
    assert torch.equal(logits(loaded), logits(model))


def test_both_adapters_in_one_save(tmp_path):
    model = trained(apply_dept(apply_prefix_tuning(tiny_gpt2(), P, projection_dim=None), M, R, S, share_prompt=False))
    model.save_pretrained(tmp_path)
    loaded = load_dept(load_prefix_tuning(tiny_gpt2(), tmp_path), tmp_path, share_prompt=False)
    assert torch.equal(logits(loaded), logits(model))


def test_a_model_saved_without_the_adapter_is_named(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config.json records no dept adapter .*saved without one"):
        load_dept(tiny_gpt2(), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config.json records no prefix_tuning adapter"):
        load_prefix_tuning(tiny_gpt2(), tmp_path)
    trained(apply_prefix_tuning(tiny_gpt2(), P)).save_pretrained(tmp_path / "prefix")
    with pytest.raises(FileNotFoundError, match=r"records no dept adapter"):
        load_dept(tiny_gpt2(), tmp_path / "prefix")


def test_a_save_missing_the_adapters_tensors_is_refused(tmp_path):
    model = trained(apply_dept(tiny_gpt2(), M, R, S))
    model.save_pretrained(tmp_path, state_dict={k: v for k, v in model.state_dict().items() if k != "dept_adapters.default.lora_B"})
    with pytest.raises(ValueError, match=r"saved model .*: missing tensor 'lora_B'"):
        load_dept(tiny_gpt2(), tmp_path)


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
def test_bin_whole_model_saves_reload(shard, tmp_path):
    """``pytorch_model.bin`` (and its sharded index), as older transformers write them."""
    model = trained(apply_dept(tiny_gpt2(), M, R, S))
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    for file in [name for name in os.listdir(tmp_path) if name.endswith(".safetensors")]:
        torch.save(load_file(tmp_path / file), tmp_path / file.replace("model", "pytorch_model").replace(
            ".safetensors", ".bin"))
        os.remove(tmp_path / file)
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: "pytorch_" + v.replace(".safetensors", ".bin") for k, v in index["weight_map"].items()}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        os.remove(tmp_path / "model.safetensors.index.json")
    loaded = load_dept(tiny_gpt2(), tmp_path)
    assert_same_state(adapter_state(loaded, "dept"), adapter_state(model, "dept"))
    assert torch.equal(logits(loaded), logits(model))
