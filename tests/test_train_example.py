"""The examples run (few steps, small shapes) and their loss falls: examples/train_dept.py for PT and
DePT, on the CPU threads it is given, leaving torch's thread count as it found it; and
examples/train_prefix_bart.py with its three prefixes, generating after training."""
import importlib.util
import math
import pathlib

import torch

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_dept.py"


def test_training_example_runs_and_loss_falls():
    spec = importlib.util.spec_from_file_location("train_dept", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    results = example.main(["--steps", "30", "--batch", "8", "--length", "16", "--prompt-len", "10"])
    assert torch.get_num_threads() == threads
    assert [r["threads"] for r in results] == [1, 1]  # the default: one thread
    assert [r["name"] for r in results] == ["prompt tuning", "DePT"]
    assert results[0]["trainable"] == results[1]["trainable"]  # budget() matched the parameter counts
    for r in results:
        assert math.isfinite(r["last"]) and r["last"] < r["first"] - 0.1, r


def test_prefix_bart_example_trains_three_prefixes_and_generates():
    spec = importlib.util.spec_from_file_location("train_prefix_bart", EXAMPLE.with_name("train_prefix_bart.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "40", "--batch", "8", "--projection-dim", "32"])
    assert result["groups"] == ["cross", "decoder", "encoder"]
    assert math.isfinite(result["last"]) and result["last"] < result["first"] - 0.1, result
    assert result["after"].shape == result["shown"]["labels"].shape
