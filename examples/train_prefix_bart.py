"""Prefix-Tuning a frozen BART on a summarization-style task: Li & Liang's three prefixes.

    python examples/train_prefix_bart.py               # 200 steps on one CPU thread (docs/examples.md)
    python examples/train_prefix_bart.py --steps 20    # a quick look
    python examples/train_prefix_bart.py --attentions decoder cross

The frozen base model is a small BART built from a config and randomly initialised (nothing is
downloaded). Each source is a random sequence over a small part of the vocabulary; its "summary" is
the source's tokens at even positions, reversed -- a fixed rule the prefixes must steer the frozen
model towards. The prefixes sit on the encoder's self-attention, the decoder's self-attention and
the decoder's cross-attention (``model.prefix_tuning.encoders["encoder"]``, ``["decoder"]``,
``["cross"]``), each from its own MLP (Embedding -> Linear -> tanh -> Linear, hidden 512 as in the
paper, unless ``--projection-dim`` says otherwise). The loss falls; ``generate()`` prints a few
summaries before and after. On a GPU the prefix MLP's second Linear runs the fused Triton kernel.
"""
import argparse
import time
from typing import Dict, List, Optional

import torch
from tqdm import tqdm
from transformers import BartConfig, BartForConditionalGeneration

from dept_fast import apply_prefix_tuning, trainable_parameters

PAD, START, END = 0, 2, 3


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--source-len", type=int, default=12, help="tokens per source (its summary has half)")
    parser.add_argument("--prefix-len", type=int, default=5, help="p, prefix slots per layer (preseqlen 5 in the paper)")
    parser.add_argument("--projection-dim", type=int, default=512, help="the MLP's hidden width")
    parser.add_argument("--attentions", nargs="+", default=["encoder", "decoder", "cross"],
                        choices=["encoder", "decoder", "cross"], help="which attentions get a prefix")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's CPU threads during the run (0: leave torch's count)")
    return parser.parse_args(argv)


def base_model(seed: int) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    # init_std 0.2 (BART uses 0.02): a random model whose outputs a prefix can move far enough,
    # standing in for a pretrained one.
    config = BartConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                        init_std=0.2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD,
                        bos_token_id=1, eos_token_id=END, decoder_start_token_id=START, forced_eos_token_id=None)
    return BartForConditionalGeneration(config)


class SummaryTask:
    """Sources over ``states`` tokens; a source's summary is its even positions reversed, then END."""

    def __init__(self, states: int = 16, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.arange(8, 8 + states)

    def batch(self, size: int, length: int) -> Dict[str, torch.Tensor]:
        source = self.tokens[torch.randint(0, len(self.tokens), (size, length), generator=self.generator)]
        summary = torch.cat([source[:, ::2].flip(1), torch.full((size, 1), END)], 1)
        return {"input_ids": source, "attention_mask": torch.ones_like(source), "labels": summary}


def summaries(model: BartForConditionalGeneration, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              max_new_tokens=batch["labels"].shape[1], do_sample=False)[:, 1:]


def train(args: argparse.Namespace) -> dict:
    model = apply_prefix_tuning(base_model(args.seed), args.prefix_len, projection_dim=args.projection_dim,
                                attentions=args.attentions).to(args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    task = SummaryTask(seed=args.seed)
    shown = {k: v[:3].to(args.device) for k, v in task.batch(8, args.source_len).items()}
    before = summaries(model.eval(), shown)
    model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"Prefix-Tuning BART ({', '.join(args.attentions)})", unit="step")
    for _ in bar:
        batch = {k: v.to(args.device) for k, v in task.batch(args.batch, args.source_len).items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    after = summaries(model.eval(), shown)
    window = max(1, min(10, args.steps // 5))
    return {"groups": sorted(model.prefix_tuning.encoders), "trainable": trainable_parameters(model).trainable,
            "first": sum(losses[:window]) / window, "last": sum(losses[-window:]) / window,
            "seconds": time.perf_counter() - start, "shown": shown, "before": before, "after": after}


def main(argv: Optional[List[str]] = None) -> dict:
    """Train, print and return the results; torch's thread count is restored after."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = train(args)
    finally:
        torch.set_num_threads(threads)
    print(f"\nprefixes on {result['groups']}: {result['trainable']:,} trainable parameters; loss "
          f"{result['first']:.3f} -> {result['last']:.3f} in {result['seconds']:.1f} s on {args.device}")
    for i in range(len(result["after"])):
        print(f"source {result['shown']['input_ids'][i].tolist()}\n  target {result['shown']['labels'][i].tolist()}\n"
              f"  before {result['before'][i].tolist()}\n  after  {result['after'][i].tolist()}")
    return result


if __name__ == "__main__":
    main()
