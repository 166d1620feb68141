"""param_groups(): two learning rates for DePT, usable by torch.optim and the HF Trainer."""
import pytest
import torch

from dept_fast import apply_dept, param_groups
from tiny_models import VOCAB, tiny_gpt2


def batch():
    ids = torch.randint(3, VOCAB, (2, 6))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_groups_and_learning_rates_reach_the_right_parameters():
    model = apply_dept(tiny_gpt2(), 3, 4, 16)
    groups = param_groups(model, lr_prompt=0.3, lr_lowrank=0.0, weight_decay=0.01)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("dept_prompt", 0.3, 0.01),
                                                                         ("dept_lowrank", 0.0, 0.01)]
    assert groups[0]["params"] == [model.dept.prompt]
    assert groups[1]["params"] == [model.dept.lora_A, model.dept.lora_B]
    before = {n: p.detach().clone() for n, p in model.dept.named_parameters()}
    optimizer = torch.optim.AdamW(groups)
    model(**batch()).loss.backward()
    optimizer.step()
    assert not torch.equal(model.dept.prompt, before["prompt"])          # lr_prompt > 0 moved it
    assert torch.equal(model.dept.lora_A, before["lora_A"])              # lr_lowrank = 0 kept A, B
    assert torch.equal(model.dept.word_embeddings.weight, before["word_embeddings.weight"])


def test_rank_zero_has_one_group_and_other_parameters_need_a_rate():
    model = apply_dept(tiny_gpt2(), 3, 0, 16)
    assert [g["name"] for g in param_groups(model, 0.3, 1e-4)] == ["dept_prompt"]
    model.lm_head.weight.requires_grad_(True)  # tied with wte: unfreezes the embeddings too
    with pytest.raises(ValueError, match="not part of the DePT adapter.*lr_other"):
        param_groups(model, 0.3, 1e-4)
    groups = param_groups(model, 0.3, 1e-4, lr_other=1e-5)
    assert groups[-1]["name"] == "other" and groups[-1]["lr"] == 1e-5
    with pytest.raises(ValueError, match="no DePT adapter"):
        param_groups(tiny_gpt2(), 0.3, 1e-4)


def test_hf_trainer_runs_with_the_groups(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = apply_dept(tiny_gpt2(), 3, 4, 16)
    before = model.dept.prompt.detach().clone()
    optimizer = torch.optim.AdamW(param_groups(model, lr_prompt=0.3, lr_lowrank=1e-4))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    data = [{k: v[0] for k, v in batch().items()} for _ in range(4)]
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["dept_prompt", "dept_lowrank"]
    assert not torch.equal(model.dept.prompt, before)
