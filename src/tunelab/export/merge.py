"""Target `merge`: the merged model as a plain HF directory that `AutoModelForCausalLM.from_pretrained` loads without
tunelab or peft (fp32 safetensors, config, generation config, tokenizer with the run's chat template).

For a full fine-tune or an HF model directory there is nothing to merge and this is a copy."""

from __future__ import annotations

import torch

from tunelab.export.context import Artifact, ExportContext, ExportOptions, ExportSource, files_size


def check(source: ExportSource, options: ExportOptions) -> None:
    """Nothing can be refused: every causal LM transformers loads can be saved."""


def export(ctx: ExportContext) -> list[Artifact]:
    from transformers import AutoModelForCausalLM

    ctx.log("merge: writing the merged model" if ctx.source.kind == "adapter" else "merge: copying the model (nothing to merge)")
    path = ctx.merged_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    notes = {"merged_adapter": ctx.source.kind == "adapter"}
    return [ctx.measure("merged", path, files_size(*path.glob("*.safetensors")), model, lossless=True, greedy=True, notes=notes)]
