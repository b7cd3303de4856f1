"""Target `prune` (`--prune 0.3`): unstructured magnitude pruning of every Linear weight (the smallest |w| in each layer
set to zero, exactly round(fraction * size) of them), saved as a plain HF directory.

Embeddings, norms and the LM head (often the embedding matrix itself) are left alone. The zeros are stored densely, so the
file is as large and a dense forward as fast as before: the table shows what the sparsity costs in eval loss, which is
what tells whether a sparse runtime would be worth it.
"""

from __future__ import annotations

import torch

from tunelab.export.context import Artifact, ExportContext, ExportOptions, ExportSource, files_size


def check(source: ExportSource, options: ExportOptions) -> None:
    """The fraction is validated with the other options."""


def prune_linear_weights(model: torch.nn.Module, fraction: float) -> dict[str, float]:
    """Zero the `fraction` smallest-magnitude weights of each Linear except the LM head; returns each layer's zero fraction."""
    from torch.nn.utils import prune

    head = model.get_output_embeddings()
    sparsity = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            prune.l1_unstructured(module, "weight", amount=fraction)
            prune.remove(module, "weight")  # bake the mask into a plain weight tensor
            sparsity[name] = float((module.weight == 0).float().mean())
    return sparsity


def export(ctx: ExportContext) -> list[Artifact]:
    from transformers import AutoModelForCausalLM

    fraction = ctx.options.prune
    assert fraction is not None
    dest = ctx.out / "pruned"
    ctx.log(f"prune: zeroing {fraction:.0%} of every Linear weight by magnitude")
    model = AutoModelForCausalLM.from_pretrained(ctx.merged_dir(), dtype=torch.float32).eval()
    with torch.no_grad():
        sparsity = prune_linear_weights(model, fraction)
    model.save_pretrained(dest)
    ctx.tokenizer.save_pretrained(dest)
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules() if n in sparsity)
    total = sum(m.weight.numel() for n, m in model.named_modules() if n in sparsity)
    notes = {"prune_fraction": fraction, "linear_sparsity": round(zeros / max(total, 1), 6), "pruned_layers": len(sparsity)}
    size = files_size(*dest.glob("*.safetensors"))
    return [ctx.measure(f"pruned-{fraction:g}", dest, size, model, lossless=False, notes=notes)]
