"""A plain LoRA linear layer as one autograd node: base matmul, adapter matmuls and scaling, forward and backward.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate modules: under autocast each step re-casts the
fp32 adapter weights, multiplies the [tokens, out] adapter output by the scaling, adds it to the base output, and the
backward pass undoes each of those (and sums the input's two gradients) elementwise. Here the scaling rides on the
matmul (`addmm_(..., alpha=scaling)`), the adapter weights are cast once per optimizer step (`precision.cached_cast`),
and the input's gradient is one matmul plus one accumulating matmul. Same values up to the rounding of a sum (one
tensor per bf16 product, as before). Measured on one core, 256 tokens, rank 16, bf16 forward + backward
(`python bench/lora_layer.py`): 1.03-1.27x per layer (576->192 1.21 ms against PEFT's 1.54, 1536->576 5.6 against
6.2); SmolLM2-135M LoRA training (bench/train_throughput.py) ran 5% faster over two paired runs (320/310 against
296/303 tokens/s).

Only the layers where it computes exactly what PEFT would are switched (`use_fused_lora`): one active vanilla adapter
(no DoRA or other variant, no adapter bias), no dropout while training, an `nn.Linear` base whose weight and bias are
frozen. Anything else in a call (a disabled or merged adapter, mixed-adapter batches) goes to PEFT's own forward.
`restore_lora(model, switched)` gives the layers their PEFT class back.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from tunelab.train.precision import cached_cast, shared_cast


class _LoraLinear(torch.autograd.Function):
    """x @ W^T (+ bias) + scaling * (x @ A^T) @ B^T for x [T, in] in the compute dtype, W and bias frozen, A [r, in] and
    B [out, r] trainable (their gradients return in their own dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        dtype = x.dtype
        w, a, b = cached_cast(weight, dtype), cached_cast(lora_a, dtype), cached_cast(lora_b, dtype)
        with torch.autocast(x.device.type, enabled=False):
            down = torch.mm(x, a.t())  # [T, r]
            out = torch.mm(x, w.t()) if bias is None else torch.addmm(cached_cast(bias, dtype), x, w.t())
            out.addmm_(down, b.t(), alpha=scaling)
        ctx.save_for_backward(x, down, w, a, b)
        ctx.scaling = scaling
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, down, w, a, b = ctx.saved_tensors
        grad = grad.to(x.dtype)
        with torch.autocast(grad.device.type, enabled=False):
            grad_down = torch.mm(grad, b).mul_(ctx.scaling)  # [T, r]
            grad_x = torch.mm(grad, w).addmm_(grad_down, a) if ctx.needs_input_grad[0] else None
            grad_a = torch.mm(grad_down.t(), x).to(ctx.dtypes[0]) if ctx.needs_input_grad[3] else None
            grad_b = torch.mm(grad.t(), down).to(ctx.dtypes[1]).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_a, grad_b, None


def _fusable(layer) -> str | None:
    """The adapter name when `layer` (a PEFT LoRA Linear) can run fused in this call, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.lora_B[name].bias is not None:
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and (dropout.training and dropout.p > 0):
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    return name


@functools.cache
def _fused_class():
    from peft.tuners.lora.layer import Linear

    class FusedLoraLinear(Linear):
        """PEFT's LoRA Linear whose plain calls run `_LoraLinear`."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            name = None if args or kwargs or not x.is_floating_point() else _fusable(self)
            if name is None:
                return super().forward(x, *args, **kwargs)
            if torch.is_autocast_enabled(x.device.type):
                dtype = torch.get_autocast_dtype(x.device.type)
                if x.dtype != dtype:  # one cast shared by every layer reading x (precision._SharedCast)
                    x = shared_cast(x, dtype)
            base = self.base_layer
            out = _LoraLinear.apply(x.reshape(-1, x.shape[-1]), base.weight, base.bias, self.lora_A[name].weight,
                                    self.lora_B[name].weight, float(self.scaling[name]))
            return out.view(*x.shape[:-1], out.shape[-1])

    return FusedLoraLinear


def use_fused_lora(model: nn.Module) -> list[nn.Module]:
    """Switch every PEFT LoRA Linear of `model` (exactly that class) to the fused forward; returns the switched layers."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return []
    fused = _fused_class()
    switched = [m for m in model.modules() if type(m) is Linear]
    for layer in switched:
        layer.__class__ = fused
    return switched


def restore_lora(switched: list[nn.Module]) -> None:
    from peft.tuners.lora.layer import Linear

    for layer in switched:
        layer.__class__ = Linear
