"""The report card (`tunelab.evaluate.report`): a tiny trained run scored against its base model, the eval cache, and
report.html rendered in headless Chromium (Debian: `apt-get install -y chromium`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import build_tiny_model, build_tiny_tokenizer, run_config, write_jsonl

from tunelab import TunelabError, load_config, train
from tunelab.evaluate.report import (
    SECTION_HEADINGS,
    TaskRow,
    build_report_card,
    cached_eval,
    eval_cache_dir,
    eval_cache_key,
    fewshot_prompts,
    label_predictions,
    model_fingerprint,
    task_cache_key,
    write_report_card,
)

TOPICS = ["fox", "dog", "France", "autumn", "numbers", "ticket", "haiku", "lamp"]
BENCHMARK_ROWS = [
    {"query": "The quick brown fox", "choices": ["jumps", "sleeps", "sings"], "gold": 0},
    {"query": "Paris is the capital of", "choices": ["France", "Spain"], "gold": 0},
    {"query": "Autumn leaves are", "choices": ["falling", "flying", "frozen"], "gold": 0},
    {"query": "The lazy", "choices": ["dog", "cat"], "gold": 0},
    {"query": "Hello! How can I", "choices": ["help you", "eat"], "gold": 0},
    {"query": "def add(a, b): return", "choices": ["a + b", "a - b"], "gold": 0},
    {"query": "Thanks,", "choices": ["goodbye", "hello"], "gold": 0},
]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
INSTALL_CHROMIUM = ("report.html is checked in headless Chromium, which is not installed: run `apt-get install -y chromium` "
                    "(Debian/Ubuntu; `bash scripts/setup.sh test` installs it)")


def task_rows(n: int) -> list[dict]:
    # Responses of different lengths, so the length quartiles have more than one group.
    return [{"prompt": f"Say something about the {TOPICS[i % len(TOPICS)]} number {i}.",
             "response": f"The {TOPICS[i % len(TOPICS)]} is number {i}." + " It is quick." * (i % 4)} for i in range(n)]


@pytest.fixture(autouse=True)
def _eval_cache_follows_tunelab_cache(monkeypatch):
    monkeypatch.delenv("TUNELAB_EVAL_CACHE", raising=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir):
    """A 4-step LoRA run on 40 rows (data.split), its card built twice (the second from the cache) and written."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELAB_CACHE", str(root / "cache"))
        patch.delenv("TUNELAB_EVAL_CACHE", raising=False)  # these tests place the eval cache through TUNELAB_CACHE
        rows_file = write_jsonl(root / "rows.jsonl", task_rows(40))
        cfg = run_config(tiny_model_dir, rows_file, root / "run", data={"split": True})
        run_dir = train(load_config(cfg), quiet=True).run_dir
        benchmark = write_jsonl(root / "quiz.jsonl", BENCHMARK_ROWS)
        ood = write_jsonl(root / "ood.jsonl", [{"prompt": "Write a haiku about autumn.", "response": "Leaves fall slowly."},
                                               {"prompt": "What is the capital of France?", "response": "Paris."}])
        settings = {"forgetting": [str(benchmark)], "forgetting_limit": 5, "samples": 3, "max_new_tokens": 8,
                    "batch_size": 4, "ood": str(ood)}
        messages: list[str] = []
        start = time.perf_counter()
        first = build_report_card(run_dir, log=messages.append, **settings)
        first_seconds = time.perf_counter() - start
        json_path, html_path = write_report_card(first, root / "report")
        start = time.perf_counter()
        second = build_report_card(run_dir, **settings)
        second_seconds = time.perf_counter() - start
        yield SimpleNamespace(root=root, run_dir=run_dir, benchmark=benchmark, first=first, second=second, messages=messages,
                              json_path=json_path, html_path=html_path, first_seconds=first_seconds,
                              second_seconds=second_seconds, settings=settings)


def test_card_compares_tuned_with_base_zero_shot_and_k_shot(report):
    card = report.first
    assert card["task"]["kind"] == "generation" and card["task"]["headline_metric"] == "chrf"
    assert card["task"]["eval_split"]["name"] == "test"
    assert card["task"]["eval_split"]["path"] == str(report.run_dir / "data" / "test.jsonl")
    assert card["task"]["n"] == len((report.run_dir / "data" / "test.jsonl").read_text().splitlines())
    metrics = card["task_metrics"]
    names = ["exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "meteor"]
    for variant in ("base", "base_fewshot", "tuned"):
        assert list(metrics[variant]) == names
    for name in names:
        if metrics["tuned"][name] is None:  # meteor without WordNet
            continue
        best = max(metrics["base"][name], metrics["base_fewshot"][name])
        assert metrics["gain"][name] == pytest.approx(metrics["tuned"][name] - best)
        assert metrics["best_baseline"][name] in ("base", "base_fewshot")
    baseline = card["prompting_baseline"]
    assert baseline["fewshot"] == 3 and baseline["pool"] == str(report.run_dir / "data" / "train.jsonl")
    assert baseline["metrics"] == metrics["base_fewshot"]
    assert card["verdict"].startswith("Fine-tuning ") and "chrf" in card["verdict"] and "quiz" in card["verdict"]
    assert json.loads(report.json_path.read_text()) == card


def test_forgetting_deltas_are_tuned_minus_base_on_a_seeded_slice(report):
    forgetting = report.first["forgetting"]
    assert list(forgetting["benchmarks"]) == ["quiz"] and forgetting["worst"] == "quiz"
    row = forgetting["benchmarks"]["quiz"]
    assert row["metric"] == "acc_norm" and row["n"] == 5
    assert row["delta"] == pytest.approx(row["tuned"] - row["base"])
    assert "seeded sample" in row["slice"] and "5 of 7" in row["slice"]


def test_error_analysis_samples_ood_and_training(report):
    card = report.first
    analysis = card["error_analysis"]
    worst = analysis["worst_examples"]
    assert 1 <= len(worst) <= min(10, card["task"]["n"])
    assert [w["score"] for w in worst] == sorted(w["score"] for w in worst)
    assert {"prompt", "reference", "prediction", "baselines"} <= set(worst[0])
    assert set(worst[0]["baselines"]) == {"base", "base_fewshot"}
    buckets = analysis["length_buckets"]["buckets"]
    assert sum(b["n"] for b in buckets) == card["task"]["n"] and len(buckets) >= 2
    assert all({"base", "base_fewshot", "tuned"} <= set(b) for b in buckets)
    samples = card["samples"]
    assert len(samples) == 3 and all({"prompt", "reference", "base", "base_fewshot", "tuned"} <= set(s) for s in samples)
    assert card["ood"]["n"] == 2 and set(card["ood"]["base"]) == set(card["task_metrics"]["tuned"])
    summary = card["training"]["summary"]
    assert summary["steps"] == 4 and summary["initial_eval_loss"] is not None and summary["final_eval_loss"] is not None
    assert card["training"]["loss_curve"] == str(report.run_dir / "loss_curve.png")


def test_second_build_comes_from_the_cache_with_equal_numbers(report):
    first, second = report.first, report.second
    # base zero-shot, base k-shot, base ood, base quiz, tuned zero-shot, tuned ood, tuned quiz
    assert first["cache"]["misses"] == 7 and first["cache"]["hits"] == 0
    assert second["cache"]["hits"] == 7 and second["cache"]["misses"] == 0
    for section in ("task_metrics", "prompting_baseline", "forgetting", "error_analysis", "ood", "samples", "verdict"):
        assert second[section] == first[section], section
    assert second["models"] == first["models"]
    assert report.second_seconds < report.first_seconds / 3
    assert len(report.messages) == 8 and not any(m.endswith(": cached") for m in report.messages)  # header + 7 tasks


def test_a_tunelab_eval_result_under_the_shared_key_serves_the_report(report, tmp_path):
    from tunelab.evaluate.runner import EvalRequest, load_eval_model, run_generation

    test_file = str(report.run_dir / "data" / "test.jsonl")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
        req = EvalRequest(target=str(report.run_dir), data=test_file, max_new_tokens=8, batch_size=4)
        key = task_cache_key(model_fingerprint(report.run_dir), "generation", test_file, limit=req.limit, seed=req.seed,
                             max_new_tokens=req.max_new_tokens, precision=req.precision)
        stored, hit = cached_eval(key, lambda: run_generation(*load_eval_model(req.target), req))
        assert not hit
        card = build_report_card(report.run_dir, forgetting=[], fewshot=0, samples=1, max_new_tokens=8, batch_size=4)
    entries = {(e["model"], e["task"]): e["hit"] for e in card["cache"]["entries"]}
    assert entries == {("base", "test split"): False, ("tuned", "test split"): True}
    assert card["task_metrics"]["tuned"] == report.first["task_metrics"]["tuned"]
    assert card["task_metrics"]["tuned"]["chrf"] == stored["chrf"]
    assert card["task_metrics"]["base_fewshot"] is None and "no prompting baseline" in card["prompting_baseline"]["note"]


def test_html_renders_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail(INSTALL_CHROMIUM)
    url = report.html_path.resolve().as_uri()
    flags = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    screenshot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1200,3000", url], check=True, capture_output=True,
                   timeout=120)
    from PIL import Image

    with Image.open(screenshot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables and plots; a blank page has one or two
    dom = subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout
    assert 'data-broken-images="0"' in dom
    assert dom.count("<img ") >= 4  # task metrics, forgetting, length buckets, loss curve
    positions = [dom.find(f">{heading}</h2>") for heading in SECTION_HEADINGS]
    assert all(p > 0 for p in positions) and positions == sorted(positions), dict(zip(SECTION_HEADINGS, positions))
    assert "Out-of-domain" in dom


def test_classification_card_from_a_full_model_run(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    # A full fine-tune's run directory, by hand: the "tuned" model is another random init of the same architecture.
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer), seed=1).save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    rows = [{"prompt": f"Review {i}: {'great lamp, love it' if i % 2 else 'broken on arrival'}. Happy?",
             "response": "positive" if i % 2 else "negative"} for i in range(30)]
    write_jsonl(run / "data" / "train.jsonl", rows[:22])
    write_jsonl(run / "data" / "test.jsonl", rows[22:])
    cfg = run_config(tiny_model_dir, run / "data" / "train.jsonl", run, method={"name": "full"},
                     data={"split": {"stratify": "response"}})
    (run / "config.yaml").write_text(load_config(cfg).to_yaml())

    card = build_report_card(run, forgetting=[], fewshot=2, samples=2, batch_size=8)
    assert card["task"]["kind"] == "classification" and card["task"]["labels"] == ["negative", "positive"]
    assert card["task"]["label_field"] == "response" and card["task"]["headline_metric"] == "accuracy"
    metrics = card["task_metrics"]
    assert set(metrics["tuned"]) >= {"accuracy", "macro_f1", "micro_f1"}
    assert metrics["tuned"]["micro_f1"] == pytest.approx(metrics["tuned"]["accuracy"])
    analysis = card["error_analysis"]
    assert set(analysis["per_label"]) == {"base", "base_fewshot", "tuned"}
    assert set(analysis["per_label"]["tuned"]) == {"negative", "positive"}
    assert sum(map(sum, analysis["confusion"]["tuned"])) == 8
    assert all(w["prediction"] != w["reference"] for w in analysis["worst_examples"])  # only wrong labels
    assert card["forgetting"]["benchmarks"] == {} and "not measured" in card["verdict"]
    assert card["training"]["summary"] is None  # no summary.json: reported, not fatal
    _, html_path = write_report_card(card, tmp_path / "report")
    page = html_path.read_text()
    assert 'alt="confusion matrices"' in page and "Per label" in page


def test_cached_eval_hits_misses_and_recovers_from_a_broken_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    calls: list[int] = []

    def compute() -> dict:
        calls.append(1)
        return {"acc": 0.5, "pair": (1, 2)}

    key = {"model": "abc", "task": "generation", "settings": {"limit": None}}
    first, hit = cached_eval(key, compute)
    assert not hit and first == {"acc": 0.5, "pair": [1, 2]}  # as it reads back from JSON
    again, hit = cached_eval(dict(reversed(key.items())), compute)  # key order does not matter
    assert hit and again == first and len(calls) == 1
    _, hit = cached_eval({**key, "settings": {"limit": 5}}, compute)
    assert not hit and len(calls) == 2
    for entry in eval_cache_dir().glob("*.json"):
        entry.write_text("{not json")
    _, hit = cached_eval(key, compute)
    assert not hit and len(calls) == 3


def test_model_fingerprint_follows_the_weights(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)
    (copy / "README.md").write_text("notes")  # not part of what the model computes
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir)
    key = eval_cache_key(model_fingerprint(copy), "generation", str(weights), limit=None)
    assert key["data"] and key["settings"] == {"limit": None} and key["task"] == "generation"


def test_adapter_fingerprint_follows_its_base_model(report, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    models = report.first["models"]
    assert models["tuned"]["fingerprint"] != models["base"]["fingerprint"]
    # The same adapter over another copy of the base: changing the base's weights changes the run's fingerprint.
    base = Path(shutil.copytree(tiny_model_dir, tmp_path / "base"))
    run = tmp_path / "run"
    shutil.copytree(report.run_dir / "model", run / "model")
    shutil.copyfile(report.run_dir / "config.yaml", run / "config.yaml")
    adapter_config = json.loads((run / "model" / "adapter_config.json").read_text())
    (run / "model" / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(base)}))
    before = model_fingerprint(run)
    weights = bytearray((base / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (base / "model.safetensors").write_bytes(bytes(weights))
    assert model_fingerprint(run) != before


def test_fewshot_prompts_are_seeded_earlier_turns():
    pool = [TaskRow(f"p{i}", [{"role": "user", "content": f"q{i}"}], f"a{i}") for i in range(10)]
    rows = [TaskRow("t", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q?"}], "a")]
    prompts = fewshot_prompts(rows, pool, 3, seed=7)
    assert prompts == fewshot_prompts(rows, pool, 3, seed=7) != fewshot_prompts(rows, pool, 3, seed=8)
    roles = [m["role"] for m in prompts[0]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert prompts[0][-1]["content"] == "q?"
    # A pool row identical to the question is never shown as its own example.
    assert fewshot_prompts([pool[0]], pool[:2], 1, seed=0)[0][0]["content"] == "q1"


def test_label_predictions_from_a_result_that_lists_only_errors():
    rows = [TaskRow("a", [], "yes"), TaskRow("b", [], "no"), TaskRow("c", [], "yes")]
    assert label_predictions({"errors": [{"id": "b", "label": "no", "predicted": "yes"}]}, rows) == ["yes", "yes", "yes"]


def test_bad_inputs_fail_before_any_model_is_loaded(report, tmp_path):
    with pytest.raises(TunelabError, match="not a run directory"):
        build_report_card(tmp_path)
    with pytest.raises(TunelabError, match="--forgetting-limit: must be at least 1"):
        build_report_card(report.run_dir, forgetting_limit=0)
    with pytest.raises(TunelabError, match="--precision: fp32 or bf16"):
        build_report_card(report.run_dir, precision="fp8")
    with pytest.raises(TunelabError, match="unknown benchmark 'arc_easyy'.*arc_easy"):
        build_report_card(report.run_dir, forgetting=["arc_easyy"])
    with pytest.raises(TunelabError, match="file not found"):
        build_report_card(report.run_dir, forgetting=[], ood=str(tmp_path / "missing.jsonl"))
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text(load_config({"data": {"train": str(report.root / "rows.jsonl")}}).to_yaml())
    with pytest.raises(TunelabError, match="no held-out rows to score.*data.split"):
        build_report_card(run, forgetting=[])
    (run / "model").rmdir()
    with pytest.raises(TunelabError, match="no final model yet"):
        build_report_card(run)


def test_report_verb_prints_the_verdict_and_writes_both_files(report, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tunelab.cli import app

    monkeypatch.setenv("TUNELAB_CACHE", str(report.root / "cache"))  # the fixture's cache: every result is a hit
    s = report.settings
    result = CliRunner().invoke(app, ["report", str(report.run_dir), "--out", str(tmp_path / "card"), "--forgetting", s["forgetting"][0],
                                      "--forgetting-limit", "5", "--samples", "3", "--max-new-tokens", "8", "--ood", s["ood"]])
    assert result.exit_code == 0, result.output
    assert report.first["verdict"] in result.stdout.replace("\n", " ") or report.first["verdict"][:40] in result.stdout
    assert (tmp_path / "card" / "report.html").is_file() and (tmp_path / "card" / "report.json").is_file()
    bad = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "not a run directory" in bad.stderr
