"""What every export target gets and gives back: the options, the loaded source model, the probe it is compared on, and
one `Artifact` per file written.

    ctx.model          the merged fp32 model (targets read it, never change it)
    ctx.merged_dir()   that model saved as a plain HF directory (DIR/merged when `--merge` was asked for, else scratch)
    ctx.measure(...)   parity, speed and eval loss of a loaded artifact against the source
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.export.parity import Probe, measure_model
from tunelab.train.run_dir import round_metric

QUANTIZE_CHOICES = ("int8", "int8-dynamic", "nf4")
ONNX_QUANTIZE = ("int8", "int8-dynamic")  # quantize the ONNX graph (imply --onnx)
GGUF_DTYPES = ("f16", "f32")


@dataclass(frozen=True)
class ExportOptions:
    """What `tunelab export` writes. Nothing selected means `merge`."""

    merge: bool = False
    onnx: bool = False
    quantize: str | None = None  # int8 | int8-dynamic (of the ONNX file; imply onnx) | nf4 (bitsandbytes)
    prune: float | None = None  # fraction of every Linear weight set to zero by magnitude
    gguf: bool = False
    gguf_dtype: str = "f16"
    overwrite: bool = False

    def validate(self) -> None:
        """Raises:
        TunelabError: an unknown --quantize or --gguf-dtype value, a --prune fraction outside (0, 1)."""
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise TunelabError(f"--quantize: unknown value '{self.quantize}'; "
                               "choose int8 (8-bit weights), int8-dynamic (8-bit weights and activations) or nf4 "
                               "(bitsandbytes 4-bit)")
        if self.prune is not None and not 0 < self.prune < 1:
            raise TunelabError(f"--prune: the fraction of weights to zero must be between 0 and 1, exclusive (got {self.prune}); "
                               "e.g. --prune 0.3")
        if self.gguf_dtype not in GGUF_DTYPES:
            raise TunelabError(f"--gguf-dtype: unknown value '{self.gguf_dtype}'; choose f16 or f32")

    def selected(self) -> set[str]:
        onnx_quantized = self.quantize in ONNX_QUANTIZE
        names = {name for name, on in (("merge", self.merge), ("onnx", self.onnx or onnx_quantized),
                                       ("int8", onnx_quantized), ("nf4", self.quantize == "nf4"),
                                       ("prune", self.prune is not None), ("gguf", self.gguf)) if on}
        return names or {"merge"}


@dataclass(frozen=True)
class ExportSource:
    """The thing being exported, found without loading weights."""

    target: str
    kind: str  # adapter (a LoRA/DoRA/IA3 run) | full (a run that saved every weight) | model (an HF model directory)
    run_dir: Path | None
    config: Any  # the (base) model's transformers config


@dataclass
class Artifact:
    """One written artifact and how it compares with the source model."""

    format: str
    path: str  # relative to DIR
    size_bytes: int
    max_abs_logit_diff: float
    top1_agreement: float
    ms_per_forward: float
    eval_loss: float | None
    lossless: bool  # expected to match the source to float precision (merge, onnx, gguf f32)
    notes: dict = field(default_factory=dict)

    def to_json(self, source_eval_loss: float | None) -> dict:
        change = None if self.eval_loss is None or source_eval_loss is None else round(self.eval_loss - source_eval_loss, 6)
        return {"format": self.format, "path": self.path, "size_bytes": self.size_bytes,
                "size_mb": round(self.size_bytes / 1e6, 2),
                "max_abs_logit_diff": self.max_abs_logit_diff, "top1_agreement": round(self.top1_agreement, 6),
                "ms_per_forward": round(self.ms_per_forward, 2), "eval_loss": round_metric(self.eval_loss), "eval_loss_change": change,
                "lossless": self.lossless, **self.notes}


@dataclass
class ExportContext:
    source: ExportSource
    options: ExportOptions
    model: Any  # the merged fp32 model, eval mode
    tokenizer: Any
    probe: Probe
    out: Path  # the temporary directory renamed to DIR at the end
    work: Path  # scratch, removed before the rename
    log: Callable[[str], None]
    selected: set[str]
    _merged_dir: Path | None = None

    def merged_dir(self) -> Path:
        """The merged model as a plain HF directory (safetensors, config, generation config, tokenizer, chat template)."""
        if self._merged_dir is None:
            dest = self.out / "merged" if "merge" in self.selected else self.work / "merged"
            self.model.config.use_cache = True  # an inference artifact; training runs switch the cache off
            self.model.save_pretrained(dest)
            self.tokenizer.save_pretrained(dest)
            self._merged_dir = dest
        return self._merged_dir

    def onnx_path(self) -> Path:
        return self.out / "onnx" / "model.onnx"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    def measure(self, fmt: str, path: Path, size_bytes: int, model: Any, lossless: bool, greedy: bool = False,
                notes: dict | None = None) -> Artifact:
        """Compare a loaded artifact (anything called like an HF causal LM that returns `.logits`) with the source."""
        self.log(f"{fmt}: parity, speed and eval loss")
        stats = measure_model(model, self.probe, greedy=greedy)
        extra = dict(notes or {})
        if greedy:
            extra["greedy_tokens_match"] = stats.greedy_match
        return Artifact(fmt, self.relative(path), size_bytes, stats.max_abs_logit_diff, stats.top1_agreement,
                        stats.ms_per_forward, stats.eval_loss, lossless, extra)


def require(modules: tuple[str, ...], what: str, pip: str) -> None:
    """Raises:
    TunelabError: an optional dependency is not installed (names the pip command)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise TunelabError(f"{what} needs {', '.join(missing)}; run `pip install {pip}`")


def files_size(*paths: Path) -> int:
    """Bytes of the given files, and of every file under the given directories."""
    total = 0
    for p in paths:
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            total += p.stat().st_size
    return total
