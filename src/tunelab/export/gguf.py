"""Target `gguf` (`--gguf`, llama-architecture models): one .gguf file for llama.cpp and Ollama, f16 (default) or f32,
with the tokenizer (vocabulary, merges, special tokens, chat template) in its metadata.

The tensor names are the inverse of transformers' GGUF loader (`modeling_gguf_pytorch_utils.get_gguf_hf_weights_map`,
which asks gguf-py's `TensorNameMap` for each HF name): the same map, read the other way. llama.cpp stores the q/k
projection rows permuted for its rotary layout (`LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py) and
transformers' `LlamaTensorProcessor` undoes that on load, so this writer applies it. The config keys are the ones
transformers' `GGUF_CONFIG_MAPPING["llama"]` reads back. Only byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3,
Qwen) are written; a sentencepiece vocabulary needs the scores only its tokenizer.model holds.

    tunelab export runs/demo --to exported --gguf          # exported/gguf/model-f16.gguf
    AutoModelForCausalLM.from_pretrained("exported/gguf", gguf_file="model-f16.gguf")   # how it is verified
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import TunelabError
from tunelab.export.context import Artifact, ExportContext, ExportOptions, ExportSource, require

# tokenizers pre-tokenizer layouts -> llama.cpp's `tokenizer.ggml.pre` names (llama-vocab.cpp's LLAMA_VOCAB_PRE_TYPE_*)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


def check(source: ExportSource, options: ExportOptions) -> None:
    """Raises:
    TunelabError: gguf is not installed, the model is not a plain llama architecture."""
    require(("gguf",), "--gguf", "gguf")
    config = source.config
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise TunelabError(f"--gguf: only llama-architecture models are written (this model is '{model_type}'); "
                           "use llama.cpp's convert_hf_to_gguf.py on the --merge output instead")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise TunelabError("--gguf: this llama model has attention/MLP biases, which tunelab's GGUF writer does not write; "
                           "use llama.cpp's convert_hf_to_gguf.py on the --merge output instead")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise TunelabError(f"--gguf: rope scaling '{rope.get('rope_type')}' is not written by tunelab's GGUF writer; "
                           "use llama.cpp's convert_hf_to_gguf.py on the --merge output instead")


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py `LlamaModel.permute`); transformers reverses it on load."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def gguf_tensors(model: torch.nn.Module, dtype: str) -> list[tuple[str, np.ndarray]]:
    """(gguf name, array) for every weight, named, permuted and cast as llama.cpp expects (1-D tensors stay f32)."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tensors = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and config.tie_word_embeddings):
            continue  # recomputed at load time / the same matrix as the embedding (no output.weight means tied)
        stem, _, suffix = hf_name.rpartition(".")
        name = name_map.get_name(stem)
        if name is None:
            raise TunelabError(f"--gguf: no GGUF name for tensor '{hf_name}'; this llama variant is not supported, "
                               "use llama.cpp's convert_hf_to_gguf.py on the --merge output instead")
        array = tensor.detach().float().cpu().numpy()
        if name.endswith(".attn_q"):
            array = llama_cpp_permute(array, heads, heads)
        elif name.endswith(".attn_k"):
            array = llama_cpp_permute(array, heads, kv_heads)
        if dtype == "f16" and array.ndim > 1:
            array = array.astype(np.float16)
        tensors.append((f"{name}.{suffix}", np.ascontiguousarray(array)))
    return tensors


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer layout, None when it is not one it knows."""
    if not pre:
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    return None


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict[str, Any]:
    """Vocabulary, merges, token types and special ids of a byte-level BPE tokenizer, padded to the embedding rows.

    Raises:
        TunelabError: the tokenizer is not byte-level BPE.
    """
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise TunelabError(f"--gguf: only byte-level BPE tokenizers (GPT-2 style) are written, this one is {model.get('type')} "
                           f"with a {(spec.get('decoder') or {}).get('type')} decoder; use llama.cpp's convert_hf_to_gguf.py "
                           "on the --merge output instead")
    ids = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    size = max(vocab_size, max(ids.values()) + 1, max(added, default=-1) + 1)
    if size > vocab_size:
        raise TunelabError(f"--gguf: the tokenizer has {size} tokens but the model only {vocab_size} embedding rows; "
                           "resize the embeddings (model.resize_token_embeddings) before exporting")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for token, i in ids.items():
        tokens[i], types[i] = token, int(gguf.TokenType.NORMAL)
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(spec.get("pre_tokenizer")),
            "add_bos": len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id,
            "add_eos": len(probe) > len(plain) and probe[-1] == tokenizer.eos_token_id}


def write_gguf(model: torch.nn.Module, tokenizer, path: Path, dtype: str, name: str) -> list[str]:
    """Write a llama GGUF; returns warnings (e.g. a pre-tokenizer llama.cpp may not split the same way)."""
    import gguf

    config = model.config
    tok = tokenizer_metadata(tokenizer, config.vocab_size)
    warnings = []
    if tok["pre"] is None:
        warnings.append("gguf: the tokenizer's pre-tokenizer is not one llama.cpp names; wrote 'default', so llama.cpp may "
                        "split text differently from transformers")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(len(tok["tokens"]))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"] or "default")
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
    for tensor_name, array in gguf_tensors(model, dtype):
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return warnings


def export(ctx: ExportContext) -> list[Artifact]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = ctx.options.gguf_dtype
    path = ctx.out / "gguf" / f"model-{dtype}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    ctx.log(f"gguf: writing {dtype} tensors and the tokenizer")
    name = Path(ctx.source.target).resolve().name
    warnings = write_gguf(ctx.model, ctx.tokenizer, path, dtype, name)
    # Verified the way a transformers user would read it: the GGUF loader, with its own tokenizer rebuild.
    import transformers.modeling_gguf_pytorch_utils as gguf_loader

    bar = gguf_loader.tqdm
    gguf_loader.tqdm = functools.partial(bar, disable=True)  # its own progress bar ignores transformers' verbosity
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        gguf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    finally:
        gguf_loader.tqdm = bar
    same = all(gguf_tok(t, add_special_tokens=False)["input_ids"] == ids[0].tolist()
               for t, ids in zip(_rendered(ctx.tokenizer), ctx.probe.prompts))
    notes = {"tensor_dtype": dtype, "tokenizer_ids_match": same, "warnings": warnings}
    return [ctx.measure(f"gguf-{dtype}", path, path.stat().st_size, model, lossless=dtype == "f32", greedy=True, notes=notes)]


def _rendered(tokenizer) -> list[str]:
    from tunelab.export.parity import PARITY_PROMPTS

    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in PARITY_PROMPTS]
