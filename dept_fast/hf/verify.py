"""The self-check every ``apply_*`` / ``load_*`` runs before it returns: derive, then verify.

What the integration derives from a model (the scale its embedding module applies, the module where
its forward begins each stack, whether a shared prompt can be exact) could still be wrong for a model
it has never seen. So each attach runs a tiny probe -- a few tokens, batch 1, eval mode, no gradients
-- through the model's own ``forward()`` with temporary probe adapters of the same kind and route:

* identity: an adapter that changes nothing (DePT: no prompt, zero update; Prefix-Tuning: the model
  on the prefix attention without a prefix) must give the plain model's logits, computed before
  anything was attached;
* perturbed: an adapter with random values must change the logits, and give those of a reference
  built from the plain model alone: DePT, the plain model fed ``inputs_embeds = [P ; emb(ids) +
  scaling * (A @ B)[:L]]`` (``emb`` its own embedding module) -- logits, loss, and for an
  encoder-decoder the first step of ``generate()``; Prefix-Tuning on a causal decoder, the plain
  model with the prefixes in a pre-filled ``DynamicCache`` (PEFT's route).

A check that does not hold raises :class:`Refused` (a ValueError) naming the model's class and what
did not hold; the caller undoes the attach (:mod:`dept_fast.hf.transaction`). Comparisons are
relative to the largest reference logit, within :func:`probe_tol`: rounding in a few-token pass stays
far below it, while what the probe exists to catch -- a missing scale, a hook off the path the
forward takes, positions that do not move after a prompt -- moves the logits by a large fraction of
their size. Models on the meta device have no values to compare and are not probed.
"""
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

from ..distributed import gathered, gathered_forward
from ..modules.dept_embedding import table_size
from .adapters import BASE, CONTAINERS, DEPT, PREFIX, ROWS_KWARG, adapter_names

PROBE = "__dept_fast_probe__"
"""The name temporary probe adapters are registered under (a name users cannot give)."""
TOKENS = 4


class Refused(ValueError):
    """An adapter failed the self-check at attach."""


def probe_tol(dtype: torch.dtype) -> float:
    """sqrt(eps) of ``dtype``: half its digits (fp32 3.5e-4, bf16 0.088, fp16 0.031)."""
    return math.sqrt(torch.finfo(dtype).eps)


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _on_meta(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


@contextmanager
def probing(model: nn.Module, *tensors: torch.Tensor) -> Iterator[None]:
    """Eval mode (restored after), no gradients, and ZeRO-3 parameters gathered as each module runs
    (``tensors`` read outside any module's forward gathered throughout)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with ExitStack() as scope:
            scope.enter_context(torch.no_grad())
            scope.enter_context(gathered_forward(model))
            scope.enter_context(gathered(tensors))
            yield
    finally:
        for module, training in modes:
            module.training = training


def plain_call(model: nn.Module, **inputs) -> Any:
    """``model(**inputs)`` as the plain model: its adapters (if any are attached yet) take no row."""
    if adapter_names(model):
        inputs[ROWS_KWARG] = [BASE] * next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    return model(**inputs)


@contextmanager
def own_random_numbers(device: torch.device) -> Iterator[None]:
    """Whatever random numbers are drawn inside (building probe adapters) leave the caller's
    generators (CPU, and ``device``'s if it is a GPU) as they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


@contextmanager
def temporary_adapter(model: nn.Module, kind: str, adapter: nn.Module) -> Iterator[None]:
    """``adapter`` registered as :data:`PROBE` of ``kind`` for the duration of the context."""
    container = model._modules[CONTAINERS[kind]]
    container[PROBE] = adapter
    try:
        yield
    finally:
        del container[PROBE]


def _probe_ids(model: nn.Module, vocab: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, TOKENS), generator=generator).to(device)


def _decoder_start(model: nn.Module, device: torch.device) -> Dict[str, torch.Tensor]:
    if not getattr(model.config, "is_encoder_decoder", False):
        return {}
    start = getattr(model.config, "decoder_start_token_id", None)
    return {"decoder_input_ids": torch.full((1, 1), 0 if start is None else start, dtype=torch.long, device=device)}


def _require(condition: bool, model: nn.Module, what: str) -> None:
    if not condition:
        raise Refused(f"{type(model).__name__}: {what}")


@dataclass
class DePTProbe:
    """The plain model's numbers a DePT attach is checked against, computed before attaching."""

    embeddings: nn.Embedding
    ids: torch.Tensor
    decoder: Dict[str, torch.Tensor]
    plain: torch.Tensor
    tensors: List[torch.Tensor]
    """Perturbed adapter: prompt (2, d), lora_A (TOKENS, 2), lora_B (2, d)."""
    scaling: float
    reference: torch.Tensor
    reference_loss: Optional[torch.Tensor]
    generated: Optional[torch.Tensor]
    """Encoder-decoders: the first ``generate()`` step's logits of the reference (the encoder runs apart)."""

    @classmethod
    def prepare(cls, model: nn.Module, embeddings: nn.Embedding) -> Optional["DePTProbe"]:
        """Run the plain model on the probe (None on the meta device)."""
        weight = embeddings.weight
        if _on_meta(model):
            return None
        with probing(model, weight):
            ids = _probe_ids(model, weight.shape[0], weight.device)
            decoder = _decoder_start(model, weight.device)
            plain = _logits(plain_call(model, input_ids=ids, **decoder))
            rows = embeddings(ids)
            rms = rows.float().pow(2).mean().sqrt().clamp_min(1e-3)
            generator = torch.Generator().manual_seed(1)
            rank, scaling = 2, 1.0

            def draw(*shape: int, scale: float = 1.0) -> torch.Tensor:
                return (torch.randn(*shape, generator=generator) * scale).to(weight.device, weight.dtype)

            tensors = [draw(2, weight.shape[1], scale=rms.item()), draw(TOKENS, rank),
                       draw(rank, weight.shape[1], scale=rms.item() / math.sqrt(rank))]
            embeds = torch.cat([tensors[0][None], rows + scaling * (tensors[1] @ tensors[2])], 1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=weight.device)
            labels = None if decoder else torch.cat([torch.full((1, 2), -100, device=ids.device), ids], 1)
            reference = plain_call(model, inputs_embeds=embeds, attention_mask=mask, labels=labels, **decoder)
            generated = None
            if decoder:
                generated = _logits(reference)[:, 0]
        return cls(embeddings, ids, decoder, plain, tensors, scaling, _logits(reference),
                   None if labels is None else reference.loss, generated)

    def verify(self, model: nn.Module, probe_adapter) -> None:
        """Check the attached DePT route with probe adapters built by ``probe_adapter(m, rank)`` (a
        FusedDePTEmbedding around the model's embeddings on the route of the adapter being attached)."""
        dtype = self.plain.dtype
        tol = probe_tol(dtype)
        with probing(model, self.embeddings.weight):
            identity = probe_adapter(0, 1)
            with temporary_adapter(model, DEPT, identity):
                got = _logits(model(input_ids=self.ids, **self.decoder, **{ROWS_KWARG: [PROBE]}))
            _require(got.shape == self.plain.shape and _relative(got, self.plain) <= tol, model,
                     "with a DePT adapter at its identity (no prompt, zero update) the model does not give the plain "
                     "model's logits: its forward does not give the plain model's outputs when fed its own "
                     "embedding module's output as inputs_embeds (it changes the embeddings it computes itself, "
                     "e.g. scales them outside the embedding module), or DePT's inputs never reach it")
            perturbed = probe_adapter(2, 2)
            perturbed.scaling = self.scaling
            with torch.no_grad():
                for p, value in zip((perturbed.prompt, perturbed.lora_A, perturbed.lora_B), self.tensors):
                    p.copy_(value)
            labels = None if self.decoder else self.ids
            with temporary_adapter(model, DEPT, perturbed):
                out = model(input_ids=self.ids, labels=labels, **self.decoder, **{ROWS_KWARG: [PROBE]})
                generated = None
                if self.generated is not None:
                    generated = model.generate(input_ids=self.ids, attention_mask=torch.ones_like(self.ids),
                                               max_new_tokens=1, min_new_tokens=1, do_sample=False, output_logits=True,
                                               return_dict_in_generate=True, **{ROWS_KWARG: [PROBE]}).logits[0]
            got = _logits(out)
            reference = self.reference[:, -got.shape[1]:]  # a shared prompt's logits cover the inputs only
            _require(_relative(got[:, -self.plain.shape[1]:], self.plain) > tol, model,
                     "a perturbed DePT adapter does not change the logits: the model's forward does not take the "
                     "inputs DePT builds")
            _require(got.shape == reference.shape and _relative(got, reference) <= tol, model,
                     "a perturbed DePT adapter does not give the logits of the plain model fed [P ; emb(ids) + "
                     f"scaling * (A @ B)] (relative error {_relative(got, reference) if got.shape == reference.shape else 'shape'}"
                     f" > {tol:.2g})")
            if self.reference_loss is not None:
                _require(abs(out.loss.item() - self.reference_loss.item()) <= tol * abs(self.reference_loss.item()),
                         model, f"a perturbed DePT adapter's loss {out.loss.item():.6g} is not the plain model's "
                                f"{self.reference_loss.item():.6g} on the same inputs (a label convention not followed)")
            if generated is not None:
                _require(_relative(generated, self.generated) <= tol, model,
                         "generate() with a perturbed DePT adapter does not give the plain model's first step on its "
                         "inputs: the encoder, run apart by generate(), does not receive them")


@dataclass
class PrefixProbe:
    """The plain model's logits a Prefix-Tuning attach is checked against, computed before attaching."""

    ids: torch.Tensor
    decoder: Dict[str, torch.Tensor]
    plain: torch.Tensor

    @classmethod
    def prepare(cls, model: nn.Module) -> Optional["PrefixProbe"]:
        if _on_meta(model):
            return None
        embeddings = model.get_input_embeddings()
        device = next(model.parameters()).device
        with probing(model):
            ids = _probe_ids(model, table_size(embeddings)[0], device)
            decoder = _decoder_start(model, device)
            return cls(ids, decoder, _logits(plain_call(model, input_ids=ids, **decoder)))

    def verify(self, model: nn.Module, probe_adapter: nn.Module, cache_reference) -> None:
        """Check the prefix route: the model on it without a prefix gives the plain logits, the
        ``probe_adapter`` (random prefixes) changes them and, where ``cache_reference(ids, adapter)``
        gives logits (causal decoders), gives those."""
        tol = probe_tol(self.plain.dtype)
        with probing(model):
            got = _logits(plain_call(model, input_ids=self.ids, **self.decoder))
            _require(_relative(got, self.plain) <= tol, model,
                     "on the prefix attention without a prefix the model does not give its own logits")
            with temporary_adapter(model, PREFIX, probe_adapter):
                got = _logits(model(input_ids=self.ids, **self.decoder, **{ROWS_KWARG: [PROBE]}))
            _require(_relative(got, self.plain) > tol, model,
                     "random prefixes do not change the logits: the prefixes never reach the attention layers the "
                     "model's forward runs")
            reference = cache_reference(self.ids, probe_adapter)
            if reference is not None:
                _require(_relative(got, reference) <= tol, model,
                         "the prefixes do not give the logits of the plain model with them in a pre-filled cache "
                         f"(PEFT's route; relative error {_relative(got, reference):.3g} > {tol:.2g})")


def padding_moves_positions(model: nn.Module) -> bool:
    """Whether one masked slot before a decoder's tokens changes their logits: the model places tokens
    by column, not by its mask (derived by running the plain model; False on the meta device)."""
    if _on_meta(model):
        return False
    device = next(model.parameters()).device
    with probing(model):
        ids = _probe_ids(model, table_size(model.get_input_embeddings())[0], device)
        alone = _logits(plain_call(model, input_ids=ids))
        padded = torch.cat([torch.zeros_like(ids[:, :1]), ids], 1)
        mask = torch.ones_like(padded)
        mask[:, 0] = 0
        shifted = _logits(plain_call(model, input_ids=padded, attention_mask=mask))[:, 1:]
    return _relative(shifted, alone) > probe_tol(alone.dtype)
