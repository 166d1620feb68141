"""Prompt tuning vs DePT at the same parameter budget, on a tiny GPT-2 built from a config.

    python examples/train_dept.py                # 300 steps per adapter on one CPU thread (docs/examples.md)
    python examples/train_dept.py --steps 20     # a quick look
    python examples/train_dept.py --threads 0    # torch's default thread count (one per core)

The frozen base model is randomly initialised (nothing is downloaded); the task is language
modelling of sequences from a fixed random Markov chain over a small part of the vocabulary, so
the loss falls from ln(vocab) as the soft prompt (and, for DePT, the position-wise low-rank
update of the input embeddings) learn to steer the frozen model. DePT's (m, r) comes from
``dept_fast.budget`` so both adapters train the same number of parameters. On a GPU the DePT
embedding stage runs the fused Triton kernels; on a CPU its PyTorch reference.

The model is tiny, so on a CPU the example runs on one thread by default: more threads gain
little here, and with torch's default (a thread per core, each waiting for the others at every op)
another process busy on one core slows the whole run.
"""
import argparse
import time

import torch
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from dept_fast import apply_dept, budget, param_groups


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per adapter")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32, help="tokens per training sequence (= max_length)")
    parser.add_argument("--prompt-len", type=int, default=20, help="prompt tuning's length l; DePT matches its budget")
    parser.add_argument("--lr-prompt", type=float, default=0.3)
    parser.add_argument("--lr-lowrank", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's CPU threads during the run (0: leave torch's count, by default one per core)")
    return parser.parse_args(argv)


def base_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # initializer_range 0.3 (GPT-2 uses 0.02): a random model whose logits can move far enough
    # for a prompt to steer it, standing in for a pretrained one.
    config = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=4, n_head=4, initializer_range=0.3,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config)


class MarkovTask:
    """Sequences from a random Markov chain on ``states`` tokens, each with two likely successors."""

    def __init__(self, vocab: int, states: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randperm(vocab, generator=generator)[:states]
        logits = torch.full((states, states), -4.0)
        successors = torch.randint(0, states, (states, 2), generator=generator)
        logits.scatter_(1, successors, 2.0)
        self.transitions = logits.softmax(-1)
        self.generator = generator

    def batch(self, size: int, length: int) -> torch.Tensor:
        state = torch.randint(0, len(self.tokens), (size,), generator=self.generator)
        states = [state]
        for _ in range(length - 1):
            state = torch.multinomial(self.transitions[state], 1, generator=self.generator).squeeze(1)
            states.append(state)
        return self.tokens[torch.stack(states, 1)]


def train(name: str, num_prompt_tokens: int, rank: int, args: argparse.Namespace) -> dict:
    model = apply_dept(base_model(args.seed), num_prompt_tokens, rank, args.length).to(args.device).train()
    optimizer = torch.optim.AdamW(param_groups(model, lr_prompt=args.lr_prompt, lr_lowrank=args.lr_lowrank))
    task = MarkovTask(model.config.vocab_size, seed=args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{name} (m={num_prompt_tokens}, r={rank})", unit="step")
    for _ in bar:
        ids = task.batch(args.batch, args.length).to(args.device)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    window = max(1, min(10, args.steps // 5))
    return {"name": name, "trainable": trainable, "first": sum(losses[:window]) / window,
            "last": sum(losses[-window:]) / window, "seconds": time.perf_counter() - start,
            "threads": torch.get_num_threads()}


def main(argv=None) -> list:
    """Train both adapters, print and return their results; torch's thread count is restored after."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return compare(args)
    finally:
        torch.set_num_threads(threads)


def compare(args: argparse.Namespace) -> list:
    """Prompt tuning with ``args.prompt_len`` tokens, then DePT at the same budget."""
    hidden = base_model(args.seed).config.n_embd
    pairs = budget(args.prompt_len, args.length, hidden)[1:]  # [0] is (l, 0): prompt tuning itself
    if not pairs:
        raise SystemExit(f"no DePT split (m, r > 0) has exactly the budget of l={args.prompt_len} at "
                         f"s={args.length}, d={hidden}; try another --prompt-len or --length")
    m, r = min(pairs, key=lambda pair: abs(pair[0] - 0.6 * args.prompt_len))  # the paper's m ~ 0.6 l
    results = [train("prompt tuning", args.prompt_len, 0, args), train("DePT", m, r, args)]
    print(f"\nbudget l={args.prompt_len}, s={args.length}, d={hidden}; device {args.device}, "
          f"{torch.get_num_threads()} CPU thread(s)")
    for res in results:
        print(f"{res['name']:>14}: {res['trainable']:,} trainable, loss {res['first']:.3f} -> {res['last']:.3f} "
              f"in {res['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
