"""Target `onnx`: the merged model as one ONNX graph (input_ids, attention_mask -> logits; dynamic batch and length, no
KV cache), checked with onnxruntime: logits on the parity prompts and greedy replies token for token.

Why `torch.onnx.export(dynamo=True)` and not optimum: optimum 2.x moved its ONNX exporters to `optimum-onnx`, whose only
release (0.1.0) pins transformers<4.58 and imports `transformers.modeling_utils.get_parameter_dtype`, gone in 5.x; it
fails at import with transformers 5.23. Of torch's two exporters, the TorchScript one (`dynamo=False`) is faster (14 s
against 52 s for SmolLM2-135M) but deprecated since torch 2.9; the torch.export-based one is the supported path, and its
logits match transformers to float precision (max |dlogit| 8e-5 on SmolLM2-135M) at every attended position (padded
positions differ; nothing reads them). Its graph keeps `Transpose` nodes in front of the weight initializers (folding
them costs 2 more minutes in onnxscript's optimizer), which is why the int8 target folds those itself before quantizing.

    from tunelab.export.onnx import OnnxCausalLM
    model = OnnxCausalLM("exported/onnx/model.onnx")      # model(input_ids=..., attention_mask=...).logits
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from tunelab.export.context import Artifact, ExportContext, ExportOptions, ExportSource, files_size, require

PIP = "onnx onnxscript onnxruntime"
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf cannot hold a graph over 2 GB: bigger weights go to model.onnx.data


def check(source: ExportSource, options: ExportOptions) -> None:
    require(("onnx", "onnxscript", "onnxruntime"), "--onnx", PIP)


class _LogitsOnly(torch.nn.Module):
    """The causal LM with the two inputs and one output the exported graph has."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_onnx(model: torch.nn.Module, path: Path) -> None:
    """Write `model` (an HF causal LM, fp32) as an ONNX graph; weights over ~1.8 GB go to an external data file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    example = torch.ones((2, 8), dtype=torch.long)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..." per export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_LogitsOnly(model).eval(), (example, example.clone()), str(path), dynamo=True,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
                          external_data=n_bytes > EXTERNAL_DATA_BYTES, optimize=False, verbose=False, report=False)


class OnnxCausalLM(torch.nn.Module):
    """An onnxruntime session called like an HF causal LM (returns `.logits`), so the training loop's evaluation, the
    parity checks and a greedy loop can run on it unchanged."""

    def __init__(self, path: Path | str) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config = SimpleNamespace(final_logit_softcapping=None)

    def get_output_embeddings(self) -> None:  # tells causal_lm_loss to take full logits from forward()
        return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object) -> SimpleNamespace:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids.cpu().numpy(), "attention_mask": mask.cpu().numpy()})
        return SimpleNamespace(logits=torch.from_numpy(logits))


def graph_files(path: Path) -> list[Path]:
    """The graph and its external weight file, if it has one."""
    return [p for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(path.name + ".")]


def write_companions(ctx: ExportContext, dest: Path) -> None:
    """Config, generation config and tokenizer (with the chat template) next to the graph, so the directory stands alone."""
    ctx.model.config.save_pretrained(dest)
    if getattr(ctx.model, "generation_config", None) is not None:
        ctx.model.generation_config.save_pretrained(dest)
    ctx.tokenizer.save_pretrained(dest)


def export(ctx: ExportContext) -> list[Artifact]:
    path = ctx.onnx_path()
    ctx.log("onnx: exporting with torch.onnx (dynamo)")
    export_onnx(ctx.model, path)
    write_companions(ctx, path.parent)
    model = OnnxCausalLM(path)
    size = files_size(*graph_files(path))
    return [ctx.measure("onnx", path, size, model, lossless=True, greedy=True)]
