"""vLLM throughput with soft prompts sent as ``prompt_embeds`` (issue 21): requests/s and generated
tokens/s of one request set under no prompt, prompt tuning (l = 100), DePT (m = 60, r = 30) and a
batch mixing 16 DePT adapters, plus the same requests as token ids (vLLM's own embedding).

    python bench/vllm_throughput.py [--out results.json] [--prefix-caching on off] [sizes...]

Run it where vLLM is installed (``.venv-vllm``, see .ci/run), as a script: not from the checkout
root with ``-m`` (there the top-level ``kernels/`` folder would answer to ``import kernels``, a name
transformers probes for), and not through pytest (vLLM's engine takes ~40 s to start and runs its
own worker processes). The model is a randomly initialised Llama built from a config (no hub).

What is timed: ``llm.generate`` over the whole request set, greedy, every request generating exactly
``--new-tokens`` tokens (``ignore_eos``), the median of ``--rounds`` rounds after one warm-up round,
every round running every request set in turn (so a slow spell of a shared machine hits them all);
each round draws fresh token ids (same lengths), so vLLM's prefix cache can share a prompt's blocks
between requests of one adapter (as in serving) but never a whole request between rounds.
``PromptEmbedder.prompts`` (building the prompts) is timed on its own. Prompt tuning at l = 100 and
DePT at (m, r) = (60, 30) have the same trainable-parameter count for T5-base (d 768, s 256), the
paper's comparison; the ratio that matters is DePT / prompt tuning.
"""
import argparse
import json
import platform
import statistics
import tempfile
import time
from typing import Dict, List

import torch

CONFIGS = ("token ids", "no prompt", "prompt tuning l=100", "DePT m=60 r=30", "DePT x16 mixed")


def build_model(args, path: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), head_dim=64,
                         max_position_embeddings=args.max_model_len, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def attach_adapters(model, args):
    """pt (m 100, r 0), dept (m 60, r 30) and dept0..dept15 (m 60, r 30), every tensor random."""
    from dept_fast import apply_dept

    s = args.input_len * 3 // 2
    apply_dept(model, 100, 0, s, adapter_name="pt", share_prompt=False)
    for name in ["dept"] + [f"dept{i}" for i in range(16)]:
        apply_dept(model, 60, 30, s, adapter_name=name, share_prompt=False)
    with torch.no_grad():
        for p in model.dept_adapters.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return model


def request_names(config: str, n: int) -> List[str]:
    name = {"no prompt": "__base__", "prompt tuning l=100": "pt", "DePT m=60 r=30": "dept"}.get(config)
    return [name] * n if name else [f"dept{i % 16}" for i in range(n)]


def request_ids(args, seed: int) -> List[List[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(args.input_len // 2, args.input_len * 3 // 2 + 1, (args.requests,), generator=gen)
    return [torch.randint(3, args.vocab, (int(n),), generator=gen).tolist() for n in lengths]


def run(args, prefix_caching: bool, path: str, embedder) -> Dict[str, Dict[str, float]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=path, skip_tokenizer_init=True, enforce_eager=args.enforce_eager, enable_prompt_embeds=True,
              gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype,
              max_model_len=args.max_model_len, enable_prefix_caching=prefix_caching, seed=0)
    print(f"engine (prefix caching {'on' if prefix_caching else 'off'}) started in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    embed_s: Dict[str, List[float]] = {config: [] for config in CONFIGS}
    generate_s: Dict[str, List[float]] = {config: [] for config in CONFIGS}
    for round_ in range(args.rounds + 1):  # round 0: warm-up; every round runs every request set in turn
        for config in CONFIGS:
            ids = request_ids(args, seed=1000 * round_ + CONFIGS.index(config))
            t0 = time.perf_counter()
            if config == "token ids":
                prompts = [TokensPrompt(prompt_token_ids=i) for i in ids]
            else:
                prompts = embedder.prompts(ids, request_names(config, args.requests))
            t1 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            t2 = time.perf_counter()
            assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outputs)
            if round_:
                embed_s[config].append(t1 - t0)
                generate_s[config].append(t2 - t1)
    results = {}
    for config in CONFIGS:
        seconds = statistics.median(generate_s[config])
        results[config] = {"requests_per_s": args.requests / seconds,
                           "generated_tokens_per_s": args.requests * args.new_tokens / seconds,
                           "generate_s": seconds, "generate_s_rounds": generate_s[config],
                           "embed_ms": 1000 * statistics.median(embed_s[config])}
        print(f"  {config}: {results[config]}", flush=True)
    llm.llm_engine.engine_core.shutdown()
    return results


def table(results: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    lines = ["| prefix caching | request set | requests/s | generated tokens/s | × vs prompt tuning | "
             "× vs no prompt | prompts built (ms) |", "|---|---|---|---|---|---|---|"]
    for mode, rows in results.items():
        pt, base = rows["prompt tuning l=100"]["requests_per_s"], rows["no prompt"]["requests_per_s"]
        for config, row in rows.items():
            embed = "–" if config == "token ids" else f"{row['embed_ms']:.1f}"
            lines.append(f"| {mode} | {config} | {row['requests_per_s']:.2f} | {row['generated_tokens_per_s']:.1f} | "
                         f"{row['requests_per_s'] / pt:.2f} | {row['requests_per_s'] / base:.2f} | {embed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64, help="mean input length (uniform in [L/2, 3L/2])")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, help="default: 0.5 CUDA, 0.1 CPU")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (always eager on CPU)")
    parser.add_argument("--prefix-caching", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--out", help="write the results and the settings as json here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.gpu_memory_utilization = args.gpu_memory_utilization or (0.5 if cuda else 0.1)
    args.enforce_eager = args.enforce_eager or not cuda
    args.max_model_len = args.input_len * 3 // 2 + 100 + args.new_tokens

    import vllm
    from dept_fast.vllm import PromptEmbedder

    device = torch.cuda.get_device_name() if cuda else f"CPU {platform.processor() or platform.machine()}, " \
                                                       f"{torch.get_num_threads()} threads"
    print(f"device: {device}; vllm {vllm.__version__}, torch {torch.__version__}; settings {vars(args)}", flush=True)
    with tempfile.TemporaryDirectory() as path:
        model = attach_adapters(build_model(args, path), args).to(getattr(torch, args.dtype))
        embedder = PromptEmbedder.from_model(model.to("cuda" if cuda else "cpu"))
        results = {mode: run(args, mode == "on", path, embedder) for mode in args.prefix_caching}
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "vllm": vllm.__version__, "torch": torch.__version__, "settings": vars(args),
                       "results": results, "table": table(results)}, f, indent=1)


if __name__ == "__main__":
    main()
