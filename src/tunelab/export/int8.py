"""Targets `int8` and `int8-dynamic` (`--quantize ...`): 8-bit quantization of the ONNX graph with onnxruntime, so
the result runs anywhere onnxruntime does, with no Python model code.

- `int8` (weight-only): every MatMul weight becomes 8-bit integers with one fp32 scale per block of 32 input values
  (onnxruntime's `MatMulNBits`); activations stay fp32. A quarter of the fp32 size, close to the source model.
- `int8-dynamic`: onnxruntime `quantize_dynamic` (per-channel int8 weights, activations quantized per batch at run
  time, integer matmuls). Faster on CPUs with VNNI, but small models with outlier activation channels pay for the
  per-tensor activation scale: on SmolLM2-135M it measured max |dlogit| 23-25 and 64% top-1 agreement, where weight-only
  kept 1.9 and 99%.

Both quantize the file the `onnx` target wrote (so they imply `--onnx`, and the table shows the before/after pair).
torch's own dynamic quantization (`torch.ao.quantization.quantize_dynamic`) was the other option, but its quantized
Linear modules have no safetensors/`from_pretrained` form: the result could only be saved as a pickle tied to the torch
and transformers versions, not as a file a runtime loads.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tunelab.export.context import Artifact, ExportContext, ExportOptions, ExportSource, files_size, require
from tunelab.export.onnx import EXTERNAL_DATA_BYTES, PIP, OnnxCausalLM, graph_files


def check(source: ExportSource, options: ExportOptions) -> None:
    require(("onnx", "onnxscript", "onnxruntime"), "--quantize int8", PIP)


def fold_weight_transposes(src: Path, dest: Path) -> int:
    """Replace every `Transpose` of a weight initializer by the transposed initializer; returns how many were folded.

    The dynamo exporter writes `MatMul(x, Transpose(W))`; onnxruntime's quantizer only quantizes a MatMul whose weight
    is an initializer, so without this only the LM head would become int8."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    folded = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(inits[node.input[0]]).transpose(perm)
            graph.initializer.append(numpy_helper.from_array(array.copy(), node.output[0]))
            folded.append(node)
    for node in folded:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    big = sum(init.ByteSize() for init in keep) > EXTERNAL_DATA_BYTES
    onnx.save(model, str(dest), save_as_external_data=big, location=dest.name + ".data" if big else None)
    return len(folded)


BLOCK_SIZE = 32  # input values per weight scale (weight-only int8)
ACCURACY_LEVEL = 4  # int8 matmuls on activations quantized per block of 32 at run time (0: fp32 matmuls, slower)


def weight_only_int8(src: Path, dest: Path) -> None:
    """8-bit symmetric block-wise weights for every MatMul with a constant weight (MatMulNBits), activations in fp32."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    big = sum(p.stat().st_size for p in graph_files(src)) / 4 > EXTERNAL_DATA_BYTES  # int8 is a quarter of fp32
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL)
    quantizer.process()
    model = quantizer.model.model
    onnx.save(model, str(dest), save_as_external_data=big, location=dest.name + ".data" if big else None)


def dynamic_int8(src: Path, dest: Path) -> None:
    """Per-channel int8 weights, activations quantized per batch at run time (onnxruntime quantize_dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    big = sum(p.stat().st_size for p in graph_files(src)) > EXTERNAL_DATA_BYTES
    quantize_dynamic(src, dest, weight_type=QuantType.QInt8, per_channel=True, use_external_data_format=big)


KINDS = {
    "int8": ("onnx-int8", weight_only_int8, (f"onnxruntime MatMulNBits: 8-bit symmetric weights, one scale per "
                                            f"{BLOCK_SIZE} inputs; fp32 activations")),
    "int8-dynamic": ("onnx-int8-dynamic", dynamic_int8, ("onnxruntime quantize_dynamic: per-channel QInt8 weights, "
                                                         "activations quantized per batch")),
}


def export(ctx: ExportContext) -> list[Artifact]:
    fmt, quantize, note = KINDS[ctx.options.quantize]
    src = ctx.onnx_path()
    dest = ctx.out / fmt / "model.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    ctx.log(f"{ctx.options.quantize}: folding weight transposes, quantizing with onnxruntime")
    folded = ctx.work / "folded" / "model.onnx"
    folded.parent.mkdir(parents=True, exist_ok=True)
    fold_weight_transposes(src, folded)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizers log a multi-line warning per non-float tensor through the root logger
    try:
        quantize(folded, dest)
    finally:
        root.setLevel(level)
    shutil.rmtree(folded.parent)
    for companion in src.parent.iterdir():
        if companion not in graph_files(src):
            shutil.copyfile(companion, dest.parent / companion.name)
    model = OnnxCausalLM(dest)
    return [ctx.measure(fmt, dest, files_size(*graph_files(dest)), model, lossless=False, greedy=True,
                        notes={"quantization": note})]
