"""Target `nf4` (`--quantize nf4`): 4-bit NormalFloat weights with bitsandbytes, saved as an HF directory that
`AutoModelForCausalLM.from_pretrained(dir)` loads when bitsandbytes is installed (the quantization config is in
config.json). The LM head and embeddings stay fp32, as transformers' bitsandbytes integration leaves them.

bitsandbytes 0.50's CPU path works on this machine, with two limits found by trying it: every quantized Linear needs an
input size that is a multiple of the 64-weight block (its CPU kernel repacks weights in blocks; a 32-wide layer fails
with "shape '[32, 0]' is invalid"), and the model must be saved before its first forward pass, which repacks the weights
in place: saved afterwards, the reloaded model's logits were off by up to 48.
"""

from __future__ import annotations

import torch

from tunelab.errors import TunelabError
from tunelab.export.context import Artifact, ExportContext, ExportOptions, ExportSource, files_size, require

BLOCK = 64


def check(source: ExportSource, options: ExportOptions) -> None:
    """Raises:
    TunelabError: bitsandbytes is missing, or a layer is too narrow for its CPU kernel (checked on a weightless copy)."""
    require(("bitsandbytes",), "--quantize nf4", "bitsandbytes")
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        check_shapes(AutoModelForCausalLM.from_config(source.config))


def check_shapes(model: torch.nn.Module) -> None:
    """Raises:
    TunelabError: a Linear layer bitsandbytes would quantize has an input size its CPU kernel cannot block."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and module.in_features % BLOCK:
            raise TunelabError(f"--quantize nf4: bitsandbytes' CPU 4-bit kernel needs Linear input sizes that are multiples of "
                               f"{BLOCK}, and {name} takes {module.in_features}; use --quantize int8 for this model")


def export(ctx: ExportContext) -> list[Artifact]:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dest = ctx.out / "nf4"
    ctx.log("nf4: quantizing with bitsandbytes")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(ctx.merged_dir(), quantization_config=quant, device_map="cpu",
                                                     dtype=torch.float32)
        model.save_pretrained(dest)  # before any forward pass: see the module docstring
        ctx.tokenizer.save_pretrained(dest)
        del model
        model = AutoModelForCausalLM.from_pretrained(dest, device_map="cpu").eval()
        with torch.no_grad():
            model(input_ids=ctx.probe.prompts[0])
    except (RuntimeError, ValueError, ImportError) as exc:
        raise TunelabError(f"--quantize nf4: bitsandbytes cannot run 4-bit on this machine ({str(exc).splitlines()[0][:160]}); "
                           "use --quantize int8") from None
    return [ctx.measure("nf4", dest, files_size(*dest.glob("*.safetensors")), model, lossless=False,
                        notes={"quantization": "bitsandbytes nf4, fp32 compute; needs bitsandbytes to load"})]
