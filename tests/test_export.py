"""`tunelab export` on a tiny LoRA run: every target is loaded back by its reference reader (plain transformers, onnxruntime,
transformers' GGUF loader) and compared with PEFT's unmerged model; bad inputs end in exit 2, one line and no DIR."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import alpaca_rows, build_tiny_tokenizer, run_config, write_jsonl
from typer.testing import CliRunner

from tunelab import load_config, train
from tunelab.cli import app
from tunelab.export import ExportOptions, export_run
from tunelab.export.parity import PARITY_PROMPTS

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def quick_measurements():
    """One timed forward per artifact (the tests check what is measured, not how fast it is), on one thread: for the tiny
    model every op takes microseconds, and on a busy 2-core machine two threads spend milliseconds waiting for each other."""
    from tunelab.export import parity

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parity, "BENCH_MIN_RUNS", 1)
        patch.setattr(parity, "BENCH_BUDGET_S", 0.0)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-run")
    train_file = write_jsonl(root / "train.jsonl", alpaca_rows(24))
    cfg = run_config(tiny_model_dir, train_file, root / "run", data={"validation": 0.25}, training={"max_steps": 6})
    return train(load_config(cfg), quiet=True).run_dir


@pytest.fixture(scope="module")
def peft_reference(lora_run, tiny_model_dir):
    """Logits of the run as plain PEFT computes them (base + unmerged adapter), on the parity prompts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lora_run / "model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(lora_run / "model")).eval()
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)["input_ids"] for p in PARITY_PROMPTS]
    with torch.no_grad():
        return ids, [model(input_ids=i).logits for i in ids]


@pytest.fixture(scope="module")
def torch_exports(lora_run, tmp_path_factory):
    """One export of the targets that need no onnx: merge, prune and an f32 GGUF."""
    out = tmp_path_factory.mktemp("exports") / "out"
    return export_run(lora_run, out, ExportOptions(merge=True, prune=0.3, gguf=True, gguf_dtype="f32"))


def artifact(result, fmt: str) -> dict:
    return next(a for a in result.report["artifacts"] if a["format"] == fmt)


def max_diff(model, reference) -> float:
    ids, logits = reference
    with torch.no_grad():
        return max(float((model(input_ids=i).logits - ref).abs().max()) for i, ref in zip(ids, logits))


# ----------------------------------------------------------------------------------------------------------------------
# merge


def test_merge_matches_peft_and_loads_without_tunelab_or_peft(torch_exports, peft_reference, tmp_path):
    merged = torch_exports.out_dir / "merged"
    row = artifact(torch_exports, "merged")
    assert row["max_abs_logit_diff"] < 1e-4 and row["greedy_tokens_match"] == "3/3" and row["merged_adapter"]
    assert row["eval_loss"] == pytest.approx(torch_exports.report["source"]["eval_loss"], abs=1e-5)
    names = {p.name for p in merged.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert "chat_template.jinja" in names or "chat_template" in (merged / "tokenizer_config.json").read_text()
    assert not any("adapter" in n for n in names)
    # A fresh interpreter in which tunelab and peft cannot be imported loads it with plain transformers.
    ids, logits = peft_reference
    torch.save({"ids": ids, "logits": logits}, tmp_path / "ref.pt")
    code = ("import sys; sys.modules['tunelab'] = None; sys.modules['peft'] = None\n"
            "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(merged)!r}).eval()\n"
            f"tok = AutoTokenizer.from_pretrained({str(merged)!r})\n"
            "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Say something about the fox.'}], "
            "add_generation_prompt=True, return_tensors='pt', return_dict=True)['input_ids']\n"
            "assert torch.equal(ids, ref['ids'][0])\n"
            "with torch.no_grad():\n"
            "    print(max(float((model(input_ids=i).logits - l).abs().max()) for i, l in zip(ref['ids'], ref['logits'])))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-4


def test_report_file_and_table(torch_exports):
    report = json.loads((torch_exports.out_dir / "export_report.json").read_text())
    assert [a["format"] for a in report["artifacts"]] == ["merged", "pruned-0.3", "gguf-f32"]
    assert report["validation"]["examples"] == 6 and report["source"]["eval_loss"] is not None
    assert report["parity"]["prompts"] == list(PARITY_PROMPTS) and report["speed"]["batch"] == [4, 128]
    assert all(a["size_bytes"] > 0 and a["ms_per_forward"] > 0 and a["eval_loss"] is not None for a in report["artifacts"])
    assert report["warnings"] == []
    assert not [p for p in torch_exports.out_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


# ----------------------------------------------------------------------------------------------------------------------
# prune


def test_prune_zeroes_the_requested_fraction_of_linear_weights_only(torch_exports):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(torch_exports.out_dir / "merged")
    pruned = AutoModelForCausalLM.from_pretrained(torch_exports.out_dir / "pruned")
    head = pruned.get_output_embeddings()
    linears = [(n, m) for n, m in pruned.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert len(linears) == 14  # 7 per layer
    for _, module in linears:
        assert int((module.weight == 0).sum()) == round(0.3 * module.weight.numel())
    before, after = merged.state_dict(), pruned.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(before[name], after[name])
    row = artifact(torch_exports, "pruned-0.3")
    assert row["linear_sparsity"] == pytest.approx(0.3, abs=1e-3) and row["max_abs_logit_diff"] > 0


# ----------------------------------------------------------------------------------------------------------------------
# GGUF


def test_gguf_loads_back_in_transformers_with_the_same_logits_and_tokenizer(torch_exports, peft_reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = torch_exports.out_dir / "gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model-f32.gguf").eval()
    assert max_diff(model, peft_reference) < 1e-4
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="model-f32.gguf")
    text = tok.apply_chat_template([{"role": "user", "content": PARITY_PROMPTS[0]}], tokenize=False, add_generation_prompt=True)
    assert tok(text, add_special_tokens=False)["input_ids"] == peft_reference[0][0][0].tolist()
    row = artifact(torch_exports, "gguf-f32")
    assert row["tokenizer_ids_match"] and row["greedy_tokens_match"] == "3/3"


def test_llama_cpp_permutation_is_what_transformers_reverses():
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from tunelab.export.gguf import llama_cpp_permute

    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((32, 24)).astype(np.float32), rng.standard_normal((16, 24)).astype(np.float32)
    undo = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    assert np.array_equal(undo.process(llama_cpp_permute(q, 4, 4), "blk.0.attn_q.weight").weights, q)
    assert np.array_equal(undo.process(llama_cpp_permute(k, 4, 2), "blk.0.attn_k.weight").weights, k)
    assert not np.array_equal(llama_cpp_permute(q, 4, 4), q)


# ----------------------------------------------------------------------------------------------------------------------
# ONNX and int8


def test_onnx_matches_peft_and_greedy_tokens_agree_int8_runs(lora_run, peft_reference, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    result = export_run(lora_run, tmp_path / "out", ExportOptions(quantize="int8"))  # int8 implies the fp32 ONNX graph
    onnx_row, int8_row = artifact(result, "onnx"), artifact(result, "onnx-int8")
    assert onnx_row["max_abs_logit_diff"] < 1e-4 and onnx_row["greedy_tokens_match"] == "3/3"
    session = ort.InferenceSession(str(result.out_dir / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, logits = peft_reference
    for i, ref in zip(ids, logits):
        (got,) = session.run(["logits"], {"input_ids": i.numpy(), "attention_mask": torch.ones_like(i).numpy()})
        assert float((torch.from_numpy(got) - ref).abs().max()) < 1e-4
    int8 = ort.InferenceSession(str(result.out_dir / "onnx-int8" / "model.onnx"), providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in _graph(result.out_dir / "onnx-int8" / "model.onnx")]
    assert ops.count("MatMulNBits") == 2 * 7 + 1 and "MatMul" in ops  # every linear + LM head; attention stays fp32
    (got,) = int8.run(["logits"], {"input_ids": ids[0].numpy(), "attention_mask": torch.ones_like(ids[0]).numpy()})
    assert got.shape == tuple(logits[0].shape)
    assert 0 < int8_row["max_abs_logit_diff"] < 0.05 and int8_row["greedy_tokens_match"] == "3/3"  # weight-only: close
    assert 0 < int8_row["size_bytes"] < onnx_row["size_bytes"] and int8_row["ms_per_forward"] > 0
    assert int8_row["eval_loss"] is not None and abs(int8_row["eval_loss_change"]) < 0.01
    assert {"tokenizer.json", "config.json"} <= {p.name for p in (result.out_dir / "onnx-int8").iterdir()}


def test_int8_dynamic_quantizes_activations_too(lora_run, tmp_path):
    pytest.importorskip("onnxruntime")
    result = export_run(lora_run, tmp_path / "out", ExportOptions(quantize="int8-dynamic"))
    row = artifact(result, "onnx-int8-dynamic")
    ops = {n.op_type for n in _graph(result.out_dir / "onnx-int8-dynamic" / "model.onnx")}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"} and "MatMulNBits" not in ops
    assert row["max_abs_logit_diff"] > 0 and row["eval_loss"] is not None
    assert [a["format"] for a in result.report["artifacts"]] == ["onnx", "onnx-int8-dynamic"]


def _graph(path: Path):
    import onnx

    return onnx.load(str(path)).graph.node


# ----------------------------------------------------------------------------------------------------------------------
# Other targets: an HF model directory, a full fine-tune, NF4


def test_hf_model_dir_and_full_run_are_copied(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    result = export_run(tiny_model_dir, tmp_path / "out", ExportOptions())  # nothing selected: merge
    row = artifact(result, "merged")
    assert row["max_abs_logit_diff"] == 0.0 and not row["merged_adapter"] and row["eval_loss"] is None
    assert result.report["source"]["kind"] == "model"
    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8))
    run = train(load_config(run_config(tiny_model_dir, train_file, tmp_path / "full", method={"name": "full"},
                                       training={"max_steps": 2})), quiet=True).run_dir
    result = export_run(run, tmp_path / "out-full", ExportOptions(merge=True))
    assert result.report["source"]["kind"] == "full" and artifact(result, "merged")["max_abs_logit_diff"] < 1e-5
    saved = AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    copied = AutoModelForCausalLM.from_pretrained(result.out_dir / "merged").state_dict()
    assert all(torch.equal(saved[k], copied[k]) for k in saved)


def test_nf4_with_bitsandbytes_on_cpu(tmp_path):
    """bitsandbytes' CPU kernel needs 64-wide blocks, so this model is 64 wide (the shared tiny one is 32)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "wide")
    tokenizer.save_pretrained(tmp_path / "wide")
    result = export_run(tmp_path / "wide", tmp_path / "out", ExportOptions(quantize="nf4"))
    row = artifact(result, "nf4")
    assert 0 < row["size_bytes"] and row["ms_per_forward"] > 0 and 0 < row["max_abs_logit_diff"] < 1.0
    model = AutoModelForCausalLM.from_pretrained(result.out_dir / "nf4", device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert json.loads((result.out_dir / "nf4" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


# ----------------------------------------------------------------------------------------------------------------------
# The CLI: success prints the table; every bad input is one line, exit 2, and no DIR


def test_cli_refuses_a_non_empty_dir_then_overwrites_it_and_prints_the_table(lora_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = runner.invoke(app, ["export", str(lora_run), "--to", str(out), "--gguf"])
    _one_line_error(refused, "is not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    res = runner.invoke(app, ["export", str(lora_run), "--to", str(out), "--gguf", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert "gguf-f16" in res.stdout and "max |Δlogit|" in res.stdout and "export_report.json" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "gguf"]
    (row,) = json.loads((out / "export_report.json").read_text())["artifacts"]
    assert row["format"] == "gguf-f16" and row["max_abs_logit_diff"] < 0.05 and row["tokenizer_ids_match"]
    assert row["greedy_tokens_match"] == "3/3"


def _one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _non_llama_dir(tmp_path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    return tmp_path / "qwen"


@pytest.mark.parametrize("case, args, fragments", [
    ("no-model", ["--merge"], ["no final model", "--resume"]),
    ("tiny", ["--quantize", "int4"], ["--quantize: unknown value 'int4'", "int8", "nf4"]),
    ("tiny", ["--prune", "1.5"], ["--prune:", "between 0 and 1"]),
    ("tiny", ["--prune", "0"], ["--prune:", "between 0 and 1"]),
    ("tiny", ["--gguf", "--gguf-dtype", "q4"], ["--gguf-dtype: unknown value 'q4'"]),
    ("tiny", ["--merge", "--quantize", "nf4"], ["--quantize nf4"]),  # 32-wide layers: too narrow for bitsandbytes' CPU kernel
    ("qwen", ["--gguf"], ["--gguf: only llama-architecture", "'qwen2'"]),
    ("missing", ["--merge"], ["no such run or model directory"]),
])
def test_cli_user_errors(case, args, fragments, tiny_model_dir, tmp_path):
    if case == "no-model":
        target = tmp_path / "run"
        target.mkdir()
        (target / "config.yaml").write_text("model: default\n")
    else:
        target = {"tiny": tiny_model_dir, "qwen": _non_llama_dir(tmp_path) if case == "qwen" else None,
                  "missing": tmp_path / "nope"}[case]
    res = runner.invoke(app, ["export", str(target), "--to", str(tmp_path / "out"), *args])
    _one_line_error(res, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_failure_mid_export_leaves_no_directory(lora_run, tmp_path, monkeypatch):
    """The merged model is already in the temp directory when the GGUF writer fails: neither DIR nor the temp dir stays."""
    from tunelab.errors import TunelabError
    from tunelab.export import gguf

    def fail(*_args, **_kwargs):
        raise TunelabError("--gguf: simulated failure")

    monkeypatch.setattr(gguf, "write_gguf", fail)
    with pytest.raises(TunelabError, match="simulated"):
        export_run(lora_run, tmp_path / "out", ExportOptions(merge=True, gguf=True))
    assert list(tmp_path.iterdir()) == []
