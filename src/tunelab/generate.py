"""Use a trained model: load a run directory (or any model spec) and generate with the chat template training used.

    tunelab generate runs/demo --prompt "Extract the ticket ..."
    tunelab chat runs/demo
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.methods import bottleneck
from tunelab.models.loading import load_model, load_tokenizer, resolve_model


def is_run_dir(path: Path) -> bool:
    return (path / "model").is_dir() and (path / "config.yaml").is_file()


def load_for_inference(target: str | Path, reward_model: bool = False):
    """Load (model, tokenizer) from a run directory, an HF model dir, a .gguf, a hub id or 'default'.

    For a LoRA run the base model is loaded and the adapter applied with PEFT; the tokenizer (with its chat template)
    comes from the run, so generation formats prompts exactly as training did. A reward run (method reward) loads as a
    sequence classifier with its score head, only when `reward_model` says the caller wants scores.

    Raises:
        TunelabError: the target is not a run, a model, or the run has no final model yet; a reward run where a
            model that writes is wanted.
    """
    path = Path(str(target))
    if path.is_dir() and (path / "config.yaml").is_file():
        model_dir = path / "model"
        if not model_dir.is_dir():
            raise TunelabError(f"{path}: this run has no final model yet (interrupted?); resume it with `tunelab train {path / 'config.yaml'} --resume`")
        import yaml
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        run_config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        method = run_config.get("method") if isinstance(run_config.get("method"), dict) else {}
        if run_config.get("task") == "classification":
            raise TunelabError(f"{path}: a classifier predicts labels and cannot write text; use `tunelab eval {path}`, "
                               "`tunelab predict` or tunelab.methods.classification.load_classifier")
        if method.get("name") == "reward" and not reward_model:
            raise TunelabError(f"{path}: a reward model scores replies and cannot write them; load it with "
                               "AutoModelForSequenceClassification (see the README), or use a dpo or fine-tuning run here")
        adapter_json = next((model_dir / name for name in ("adapter_config.json", bottleneck.CONFIG_NAME)
                             if (model_dir / name).is_file()), None)  # PEFT's adapters, or bottleneck adapters
        if adapter_json is not None:
            from peft import PeftModel

            base_path = json.loads(adapter_json.read_text()).get("base_model_name_or_path")
            if not base_path or not Path(base_path).is_dir():  # e.g. the model cache was cleared: resolve the spec again
                base_path = resolve_model(run_config.get("model")).path
            base_source = resolve_model(base_path)
            base = load_model(base_source, **_method_load_kwargs(run_config.get("method"), base_source))
            if adapter_json.name == bottleneck.CONFIG_NAME:
                model = bottleneck.from_pretrained(base, model_dir)
            else:
                model = PeftModel.from_pretrained(base, str(model_dir))
        else:
            head = {"head": "score"} if method.get("name") == "reward" else {}
            model = load_model(resolve_model(str(model_dir)), **head)  # a full reward model keeps its score head
    else:
        source = resolve_model(str(target))
        tokenizer = load_tokenizer(source)
        model = load_model(source)
    model.eval()
    return model, tokenizer


def _method_load_kwargs(method: dict | None, source) -> dict:
    """Load the base model the way the run's method trained on it (qlora: the same 4-bit quantization), on the CPU."""
    from pydantic import TypeAdapter, ValidationError

    from tunelab.config import MethodConfig
    from tunelab.methods import method_load_kwargs

    try:
        cfg = TypeAdapter(MethodConfig).validate_python(method or {"name": "lora"})
    except ValidationError:
        return {}  # a config from another tunelab version: the plain base model
    return method_load_kwargs(cfg, source, torch.device("cpu"))


def generation_kwargs(tokenizer, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    """Greedy when temperature is 0 (or below 1e-6, where sampling is greedy anyway and logits / temperature would
    overflow to inf), else nucleus sampling; stops at the chat template's end-of-turn token."""
    sample = temperature >= 1e-6
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": sample,
        "temperature": temperature if sample else None,
        "top_p": top_p if sample else None,
        "top_k": None,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str] | list[list[dict]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    system_prompt: str | None = None,
    seed: int | None = None,
) -> list[str]:
    """Generate a reply for each prompt (a string or a message list), batched with left padding; greedy by default."""
    conversations = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        conversations.append(messages)
    if seed is not None:
        torch.manual_seed(seed)
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = [""] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, **generation_kwargs(tokenizer, max_new_tokens, temperature, top_p))
            for row, i in enumerate(idx):
                outputs[i] = tokenizer.decode(out[row, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return outputs


@torch.no_grad()
def stream_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, write=print) -> str:
    """Generate one chat reply, handing each decoded piece to `write` as it arrives; returns the whole reply."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = {**enc, **generation_kwargs(tokenizer, max_new_tokens, temperature, top_p), "streamer": streamer}
    worker = Thread(target=model.generate, kwargs=kwargs, daemon=True)
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        write(piece)
    worker.join()
    return "".join(pieces).strip()
