"""Serving DePT and prompt-tuning adapters on vLLM through ``prompt_embeds`` (docs/serving.md).

    embedder = PromptEmbedder.from_pretrained(base_model_dir, {"math": "ckpt/math", "code": "ckpt/code"})
    llm.generate(embedder.prompts(token_ids, ["math", "code", "__base__"]), sampling_params)

``embedder.py``: :class:`PromptEmbedder` (the prompts); ``input_embeddings.py``: a saved model's
input-embedding module without the model; ``completions.py``: the Completions API's encoding.
Nothing here imports vLLM.
"""
from .completions import encode_prompt_embeds
from .embedder import PromptEmbedder, check_embedding_scale
from .input_embeddings import InputEmbeddings, load_input_embeddings

__all__ = ["PromptEmbedder", "encode_prompt_embeds", "load_input_embeddings", "InputEmbeddings",
           "check_embedding_scale"]
