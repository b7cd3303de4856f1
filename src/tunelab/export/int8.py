"""Target `int8` (`--quantize int8`): onnxruntime dynamic int8 quantization of the ONNX graph (int8 weights, activations
quantized per batch at run time), so the result runs anywhere onnxruntime does, with no Python model code.

It quantizes the file the `onnx` target wrote (so `--quantize int8` implies `--onnx`, and the table shows both: the
before/after pair). torch's own dynamic quantization (`torch.ao.quantization.quantize_dynamic`) was the other option, but
its quantized Linear modules have no safetensors/`from_pretrained` form: the result could only be saved as a pickle tied
to the torch and transformers versions, not as a file a runtime loads.

Dynamic int8 quantizes activations too, one scale per tensor per batch, and small models with outlier activation channels
pay for it: on SmolLM2-135M per-channel weights got a max |dlogit| of 23 and 64% top-1 agreement (per-tensor: 29, 57%;
torch.ao's dynamic int8: 27-34, 42-45%), while onnxruntime's weight-only 8-bit MatMulNBits kept 1.9 and 99%.
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


def export(ctx: ExportContext) -> list[Artifact]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = ctx.onnx_path()
    dest = ctx.out / "onnx-int8" / "model.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    ctx.log("int8: folding weight transposes, quantizing with onnxruntime")
    folded = ctx.work / "folded" / "model.onnx"
    folded.parent.mkdir(parents=True, exist_ok=True)
    fold_weight_transposes(src, folded)
    big = sum(p.stat().st_size for p in graph_files(folded)) > EXTERNAL_DATA_BYTES
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a multi-line warning per non-float tensor through the root logger
    try:
        quantize_dynamic(folded, dest, weight_type=QuantType.QInt8, per_channel=True, use_external_data_format=big)
    finally:
        root.setLevel(level)
    shutil.rmtree(folded.parent)
    for companion in src.parent.iterdir():
        if companion not in graph_files(src):
            shutil.copyfile(companion, dest.parent / companion.name)
    model = OnnxCausalLM(dest)
    return [ctx.measure("onnx-int8", dest, files_size(*graph_files(dest)), model, lossless=False, greedy=True,
                        notes={"quantization": "onnxruntime quantize_dynamic: per-channel QInt8 weights, "
                                                  "activations quantized per batch"})]
