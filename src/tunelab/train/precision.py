"""Where and in which precision a step runs: device choice, bf16/fp16 autocast, frozen weights kept in the autocast dtype.

Master weights of trained parameters stay fp32; autocast runs the matmuls in bf16 (CPUs with AVX512-BF16/AMX, CUDA) or
fp16 (CUDA, with a GradScaler in the loop).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from tunelab.errors import TunelabError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TunelabError("training.device: cuda requested but no CUDA GPU is visible; use device: auto or cpu")
    return torch.device(name)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def pick_precision(name: str, device: torch.device, cpu_bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for the forward pass, or None for plain fp32. Master weights stay fp32 either way."""
    if name == "fp32":
        return None
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        bf16_ok = cpu_supports_bf16() if cpu_bf16 is None else cpu_bf16
    else:
        bf16_ok = False
    if name == "auto":
        return torch.bfloat16 if bf16_ok else None
    if name == "bf16":
        if not bf16_ok:
            raise TunelabError(f"training.precision: bf16 is not supported on this {device.type}; use precision: auto or fp32")
        return torch.bfloat16
    if device.type != "cuda":
        raise TunelabError("training.precision: fp16 needs a CUDA GPU; use precision: auto")
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def store_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Keep frozen linear weights in the autocast dtype, so autocast does not re-cast them every step.

    Only for adapter methods, whose saved result holds no base weights: the rounding matches what autocast applies
    to every matmul anyway. Weights tied to the input embedding are left alone.
    """
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    converted: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.is_floating_point():
            converted.add(id(module.weight))  # a quantized layer (bitsandbytes' Linear4bit subclasses nn.Linear): as it is
        elif isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and module.weight is not embedding:
            module.weight.data = module.weight.data.to(dtype)
            converted.add(id(module.weight))
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(dtype)
                converted.add(id(module.bias))
    # The weights were read from a memory-mapped safetensors file; what still points into it (the embedding, norms) is
    # copied out, so the mapping (and the whole fp32 file in resident memory: 540 MB for SmolLM2-135M) is released.
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in converted:
            tensor.data = tensor.data.clone()


def cached_cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.detach().to(dtype)`, computed once per value of `tensor` and shared by every caller (micro-batches, threads,
    the layers reading one input). An LM head tied to a frozen fp32 embedding (49k x 576 for SmolLM2) was re-cast for
    every micro-batch, 57 MB each time. The cast hangs on the tensor itself, so it lives as long as its source, and is
    made again when the tensor changes (its version moves with every in-place update; `.data =` moves its storage)."""
    if tensor.dtype == dtype:
        return tensor
    cached = getattr(tensor, "_tunelab_cast", None)
    if cached is not None and cached[0] == (dtype, tensor._version, tensor.data_ptr()):
        return cached[1]
    cast = tensor.detach().to(dtype)
    tensor._tunelab_cast = ((dtype, tensor._version, tensor.data_ptr()), cast)
    return cast


class _CastOnce(torch.autograd.Function):
    """`x.to(dtype)` whose value is computed once and shared, and whose gradient returns to `x` in x's dtype.

    Each reader gets its own node, so the readers' gradients are summed at `x` in fp32, as with autocast's own casts
    (summing them in bf16 would lose precision); the forward value is one tensor, stored once however many read it.
    """

    @staticmethod
    def forward(ctx, x, cast):
        ctx.dtype = x.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def shared_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype` through `cached_cast` (one copy for every reader), with its own `_CastOnce` node when `x` needs a
    gradient."""
    cast = cached_cast(x, dtype)
    return _CastOnce.apply(x, cast) if x.requires_grad else cast


class _SharedCast:
    """Casts a linear layer's input to the autocast dtype once for all the layers that read it.

    Under autocast every matmul casts its fp32 input itself, and autograd keeps each cast for the backward pass: the
    normalized hidden state read by q, k and v (and by each of their LoRA adapters) is stored six times. Casting it once,
    before the layers see it, computes the same values and stores them once (a third of a LoRA step's activations for a
    Llama-style model). The cast hangs on the input tensor itself, so it lives exactly as long as its source.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, module, args):
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        if x.dtype == self.dtype or not x.is_floating_point() or not torch.is_autocast_enabled(x.device.type):
            return None
        return (shared_cast(x, self.dtype), *args[1:])


def share_input_casts(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Install `_SharedCast` on every linear layer of `model`, the base layers and adapters inside PEFT layers included
    (each reader its own gradient node, so gradients meet in fp32). bitsandbytes' 4-bit layers (nn.Linear subclasses)
    get it too: they cast their input to their compute dtype themselves, which is then a no-op on the shared copy, and
    return the input's dtype, so they behave like an autocast nn.Linear; their weights are never touched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    shared = _SharedCast(dtype)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False  # PEFT would copy a bf16 input to the fp32 adapter dtype and back
        elif isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(shared)


PACK_ROWS = 256  # the rows oneDNN is told to expect when it picks a weight's blocked layout (evaluation batches: 1-512)


def can_pack_weights() -> bool:
    """Whether this torch has oneDNN's prepacked linear ops (x86 and Arm builds with mkldnn)."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    ops = ("_reorder_linear_weight", "_linear_pointwise")
    return torch.backends.mkldnn.is_available() and all(hasattr(mkldnn, op) for op in ops)


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, dtype: torch.dtype | None):
    """Inference on a CPU in bf16: for the block, each plain linear layer's weight is cast and reordered once into
    oneDNN's blocked layout, and the layer's matmuls read it as it is. Otherwise oneDNN reorders the weight on every
    call (all of a 1536 x 576 projection for a few hundred rows, 56 MB for a 49k-vocabulary LM head, which the loss
    finds on `weight._tunelab_packed`). Same values (the layout changes, not the arithmetic): bf16 perplexity of
    SmolLM2 on 120 rows gave the same loss to 6 decimals, 4-5% faster; two threads cycling through 30 layers' weights
    ran 8-11% faster (`python bench/eval_perplexity.py` for the whole evaluation).

    Only without gradients, under bf16 autocast or on bf16 inputs; anything else (training, fp32, another device, a
    layer that is not a plain `nn.Linear`) runs as before. The copies (the model's linear weights in bf16) are dropped
    when the block ends, and so are the layers' replaced `forward`s."""
    if dtype != torch.bfloat16 or not can_pack_weights():
        yield
        return
    patched: list[tuple[torch.nn.Module, object]] = []
    weights: dict[int, torch.Tensor] = {}
    try:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if type(module) is not torch.nn.Linear or weight.device.type != "cpu" or not weight.is_floating_point():
                continue
            if id(weight) not in weights:
                weights[id(weight)] = weight
                weight._tunelab_packed = (dtype, torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), PACK_ROWS))
            bias = None if module.bias is None else module.bias.detach().to(dtype)
            patched.append((module, module.__dict__.get("forward")))
            module.forward = functools.partial(_packed_forward, module.forward, weight._tunelab_packed[1], bias, dtype)
        yield
    finally:
        for module, previous in patched:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        for weight in weights.values():
            del weight._tunelab_packed


def _packed_forward(original, packed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                    x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() or x.device.type != "cpu":
        return original(x)
    if x.dtype != dtype and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype:
        x = x.to(dtype)  # as autocast would cast it
    if x.dtype != dtype:
        return original(x)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
