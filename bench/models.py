"""Model-level benchmark plumbing: base models built from configs, adapters, one training step.

A "step" is forward + backward of the loss with the base model frozen (only the adapter trains),
no optimizer. On CUDA the shapes are the benchmark protocol's (T5-base at b 32, s 256; a Llama-shaped
8-layer decoder); on CPU they are scaled down so that a smoke run stays short, and every record
says so. Suites import :data:`MODEL_CASES` and :func:`step_runner`.
"""
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import dept_fast
from dept_fast import FusedDePTEmbedding, dept_embedding_reference


@dataclass(frozen=True)
class ModelCase:
    """A base model and the adapter sizes compared on it."""
    family: str                 # "t5", "bart" (encoder-decoders) or "llama" (decoder-only)
    config: Dict
    batch: int
    seq_len: int                # input length L, also DePT's max_length s
    prompt_len: int             # vanilla prompt tuning l
    dept_prompt: int            # DePT m
    dept_rank: int              # DePT r
    prefix_len: int             # Prefix-Tuning p
    prefix_mid: int             # Prefix-Tuning MLP width
    target_len: int = 0         # decoder labels (T5)
    dtype: torch.dtype = torch.bfloat16
    scaled: bool = False        # scaled down from the GPU shape for a CPU run

    @property
    def decoder_only(self) -> bool:
        return self.family == "llama"

    @property
    def hidden(self) -> int:
        return self.config["hidden_size" if self.decoder_only else "d_model"]

    def shape(self, adapters: Optional[str] = None) -> str:
        """The base model and batch, then ``adapters`` (default: every adapter size of this case)."""
        layers = (self.config.get("num_hidden_layers") or self.config.get("num_layers")
                  or f"{self.config['encoder_layers']}+{self.config['decoder_layers']}")
        if adapters is None:
            adapters = (f"PT l{self.prompt_len}, DePT m{self.dept_prompt} r{self.dept_rank}, "
                        f"prefix p{self.prefix_len}")
        text = (f"{layers} layers d{self.hidden}, b{self.batch} L{self.seq_len}" +
                (f" T{self.target_len}" if self.target_len else "") + f", {adapters}, {str(self.dtype)[6:]}")
        return text + (", scaled down for CPU" if self.scaled else "")


T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
               num_heads=12, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# TinyLlama-1.1B's layer (d 2048, 32 query / 4 key-value heads, MLP 5632) with 8 layers.
LLAMA_8L = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
BART_BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
                 scale_embedding=False, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                 forced_eos_token_id=2)
GPU_CASES = {
    "t5-base": ModelCase("t5", T5_BASE, batch=32, seq_len=256, target_len=32, prompt_len=100, dept_prompt=60,
                         dept_rank=30, prefix_len=100, prefix_mid=512),
    "llama-decoder": ModelCase("llama", LLAMA_8L, batch=8, seq_len=1024, prompt_len=100, dept_prompt=60,
                                dept_rank=30, prefix_len=100, prefix_mid=512),
}
CPU_CASES = {
    "t5-base": ModelCase("t5", dict(T5_BASE, vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                    num_decoder_layers=2, num_heads=4),
                         batch=4, seq_len=32, target_len=8, prompt_len=10, dept_prompt=6, dept_rank=3,
                         prefix_len=10, prefix_mid=32, dtype=torch.float32, scaled=True),
    "llama-decoder": ModelCase("llama", dict(LLAMA_8L, vocab_size=512, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                                batch=4, seq_len=32, prompt_len=10, dept_prompt=6, dept_rank=3, prefix_len=10,
                                prefix_mid=32, dtype=torch.float32, scaled=True),
}
MODEL_CASES = GPU_CASES if torch.cuda.is_available() else CPU_CASES

# BART-base for the encoder-decoder Prefix-Tuning step (bench/test_prefix_seq2seq_step.py): XSUM-like
# 512-token sources and 64-token summaries on CUDA.
BART_CASE = ModelCase("bart", BART_BASE, batch=16, seq_len=512, target_len=64, prompt_len=100, dept_prompt=60,
                      dept_rank=30, prefix_len=100, prefix_mid=512)
if not torch.cuda.is_available():
    BART_CASE = replace(BART_CASE, config=dict(BART_BASE, vocab_size=512, d_model=64, encoder_layers=2,
                                               decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                               encoder_ffn_dim=128, decoder_ffn_dim=128),
                        batch=4, seq_len=32, target_len=8, prefix_len=10, prefix_mid=32, dtype=torch.float32,
                        scaled=True)

SHRINK = 1 if torch.cuda.is_available() else 4
"""How much the decoder suites shrink L, m and r (and the token counts they generate) on CPU."""
DECODER = MODEL_CASES["llama-decoder"]
"""The decoder the shared-prompt, mixed-batch and prompt-reuse suites run: LLAMA_8L in bf16 on CUDA;
on CPU 4 layers d 256 (GQA 8/2 heads) at b 8 in fp32, large enough that compute, not Python,
dominates a step."""
if DECODER.scaled:
    DECODER = replace(DECODER, batch=8, config=dict(DECODER.config, hidden_size=256, intermediate_size=688,
                                                    num_hidden_layers=4, num_attention_heads=8,
                                                    num_key_value_heads=2))


def decoder_case(length: int, prompt: int, rank: int, batch: Optional[int] = None) -> ModelCase:
    """:data:`DECODER` at input length L, DePT m and r (each divided by :data:`SHRINK`), batch b."""
    return replace(DECODER, seq_len=length // SHRINK, prompt_len=prompt // SHRINK, dept_prompt=prompt // SHRINK,
                   dept_rank=rank // SHRINK, batch=batch or DECODER.batch)


def build_model(case: ModelCase, device: torch.device) -> nn.Module:
    """The randomly initialised base model in train mode (dropout on), every weight frozen."""
    import transformers
    config_cls, model_cls = (getattr(transformers, name) for name in {
        "llama": ("LlamaConfig", "LlamaForCausalLM"), "t5": ("T5Config", "T5ForConditionalGeneration"),
        "bart": ("BartConfig", "BartForConditionalGeneration")}[case.family])
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config_cls(**case.config))
    return model.to(case.dtype).train().requires_grad_(False)


def make_batch(case: ModelCase, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random ids (no padding), an all-ones mask and labels (the ids for a decoder)."""
    gen = torch.Generator(device).manual_seed(seed)
    vocab = case.config["vocab_size"]
    ids = torch.randint(3, vocab, (case.batch, case.seq_len), generator=gen, device=device)
    labels = ids if case.decoder_only else torch.randint(3, vocab, (case.batch, case.target_len), generator=gen,
                                                          device=device)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def prompt_stage(model: nn.Module, n_prompt: int, rank: int, max_length: int,
                 fused: bool) -> Tuple[Callable[[torch.Tensor], torch.Tensor], List[nn.Parameter]]:
    """The input stage of prompt tuning (rank 0) or DePT: a callable ids -> embeddings, its parameters.

    ``fused``: the ``FusedDePTEmbedding`` module (Triton kernels on CUDA); otherwise the eager
    reference on the same parameters. lora_B is drawn at random (not the zero init), so the
    low-rank update is really computed.
    """
    module = FusedDePTEmbedding(model.get_input_embeddings(), n_prompt, rank, max_length)
    nn.init.normal_(module.lora_B, std=0.02)
    params = [p for p in module.parameters() if p.requires_grad]
    if fused:
        return module, params
    return (lambda ids: dept_embedding_reference(ids, module.weight, module.prompt, module.lora_A, module.lora_B,
                                                 module.scaling)), params


def embeds_step(model: nn.Module, stage: Callable, n_virtual: int, batch: Dict,
                decoder_only: bool) -> Callable[[], None]:
    """A step that feeds ``stage(ids)`` as ``inputs_embeds``, with the mask (and decoder labels)
    grown by the ``n_virtual`` prompt positions, as apply_dept does."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    mask = torch.cat([mask.new_ones(mask.shape[0], n_virtual), mask], dim=1)
    if decoder_only:
        labels = torch.cat([labels.new_full((labels.shape[0], n_virtual), -100), labels], dim=1)

    def step():
        model(inputs_embeds=stage(ids), attention_mask=mask, labels=labels).loss.backward()
    return step


def model_step(model: nn.Module, batch: Dict) -> Callable[[], None]:
    """A step through a model whose adapter was attached by dept_fast (called like the base model)."""
    def step():
        model(**batch).loss.backward()
    return step


def train_step(model: nn.Module, case: "ModelCase", device: torch.device) -> "StepRun":
    """``model`` (adapter attached) in train mode, stepped on ``case``'s batch, with its trainable tensors."""
    model.train()
    return StepRun(model_step(model, make_batch(case, device)), [p for p in model.parameters() if p.requires_grad])


def prefix_step_info(kind: str, model: str, method: str, baseline: Optional[str], case: "ModelCase",
                     run: "StepRun", cases: str) -> Dict:
    """The record of a Prefix-Tuning step suite (``cases``: where the CPU shapes are defined)."""
    return dict(kind=kind, model=model, method=method, baseline=baseline,
                shape=case.shape(f"prefix p{case.prefix_len} mid {case.prefix_mid}"), trainable=run.trainable,
                note=f"{kind} on CPU uses scaled-down shapes (bench/models.py {cases})" if case.scaled else None)


@dataclass
class StepRun:
    """What a suite times: the step, the trainable tensors, and optionally the input stage alone."""
    step: Callable[[], None]
    params: List[torch.Tensor]
    stage: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    stage_tokens: int = 0

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


METHODS = ["pt-eager", "dept-eager", "dept-fused", "dept-apply", "prefix"]


def unavailable(method: str, device: torch.device) -> Optional[str]:
    """Why ``method`` cannot run here, or None."""
    if method == "dept-fused" and device.type != "cuda":
        return "the fused kernels need CUDA; on CPU FusedDePTEmbedding runs the eager reference (= dept-eager)"
    return None


def step_runner(method: str, case: ModelCase, device: torch.device) -> StepRun:
    """Build the base model, attach ``method``'s adapter and return its training step."""
    model = build_model(case, device)
    batch = make_batch(case, device)
    if method in ("pt-eager", "dept-eager", "dept-fused"):
        n_prompt, rank = (case.prompt_len, 0) if method == "pt-eager" else (case.dept_prompt, case.dept_rank)
        stage, params = prompt_stage(model, n_prompt, rank, case.seq_len, fused=method == "dept-fused")
        return StepRun(embeds_step(model, stage, n_prompt, batch, case.decoder_only), params, stage, n_prompt)
    if method == "dept-apply":
        # The prompt in every row, as the dept-eager/dept-fused steps feed it; the shared prompt is
        # compared with it in bench/test_shared_prompt_step.py.
        model = dept_fast.apply_dept(model, case.dept_prompt, case.dept_rank, case.seq_len, share_prompt=False)
    elif method == "prefix":
        model = dept_fast.apply_prefix_tuning(model, case.prefix_len, projection_dim=case.prefix_mid)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for name, p in model.named_parameters():
        if p.requires_grad and name.endswith("lora_B"):
            nn.init.normal_(p, std=0.02)  # not the zero init: the update is really computed
    adapter = getattr(model, "dept", None)
    stage = adapter if isinstance(adapter, FusedDePTEmbedding) else None
    return StepRun(model_step(model, batch), params, stage, case.dept_prompt if stage is not None else 0)
