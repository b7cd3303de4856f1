"""QLoRA: the base model's linear layers quantized to 4-bit NF4 with bitsandbytes, LoRA adapters on top in fp32.

    method: {name: qlora, r: 16, alpha: 32, double_quant: true, compute_dtype: auto, optim: adamw}

`load_kwargs` gives `load_model` a `BitsAndBytesConfig`, so the weights are quantized while they load; `attach` runs
PEFT's `prepare_model_for_kbit_training` (freezes the base, keeps the non-quantized layers in fp32) and adds LoRA through
the same table as every other PEFT method. Gradient checkpointing stays the loop's decision, as for every method.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods import peft_adapters


def compute_dtype(cfg, device: torch.device) -> torch.dtype:
    """The dtype the 4-bit matmuls run in: bf16 where the device has native bf16 (auto), else fp32."""
    if cfg.compute_dtype == "auto":
        from tunelab.train.precision import pick_precision

        return torch.bfloat16 if pick_precision("auto", device) == torch.bfloat16 else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.compute_dtype]


def check_bitsandbytes(device: torch.device) -> None:
    """bitsandbytes imports and can quantize to 4 bits on `device` (tried on one block, not assumed from the version).

    Raises:
        TunelabError: bitsandbytes is missing, or has no 4-bit backend for this device.
    """
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise TunelabError("method.name: qlora needs bitsandbytes; run `pip install bitsandbytes` "
                           "(or `pip install 'tunelab[qlora]'`), or use method: lora") from None
    except Exception as exc:  # noqa: BLE001  (a broken native library raises anything at import)
        raise TunelabError(f"method.name: qlora: bitsandbytes does not load ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0][:160]}); reinstall it or use method: lora") from None
    try:
        bnbf.quantize_4bit(torch.zeros(64, device=device), quant_type="nf4")
    except Exception as exc:  # noqa: BLE001  (missing backends raise NotImplementedError, RuntimeError, ...)
        raise TunelabError(f"method.name: qlora: this bitsandbytes has no 4-bit support on {device.type} "
                           f"({exc.__class__.__name__}); upgrade it (`pip install -U bitsandbytes`) or use method: lora") from None


def load_kwargs(cfg, source, device: torch.device) -> dict:
    """`quantization_config` for `load_model`: NF4 weights, optional double quantization, the chosen compute dtype.

    Raises:
        TunelabError: see `check_bitsandbytes`.
    """
    check_bitsandbytes(device)
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg, device),
    )}


def attach(model: nn.Module, cfg, task_type: str = "CAUSAL_LM") -> nn.Module:
    """LoRA on a model `load_model` loaded with `load_kwargs(cfg, ...)`.

    Raises:
        TunelabError: the model was not loaded in 4 bits, or the LoRA target modules match nothing.
    """
    from peft import prepare_model_for_kbit_training

    if not getattr(model, "is_loaded_in_4bit", False):
        raise TunelabError("method.name: qlora needs the base model loaded in 4 bits; load it with "
                           "load_model(source, **method_load_kwargs(cfg, source, device))")
    # The loop decides on gradient checkpointing itself (PEFT's default would always turn it on).
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return peft_adapters.attach(model, cfg, task_type)

