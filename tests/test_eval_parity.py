"""Parity with lm-evaluation-harness: the same items through lm-eval's HFLM (a local-file multiple_choice task) and
through tunelab's engine give the same per-choice log-likelihoods, acc and acc_norm (bench/eval_parity.py does the
same on real benchmarks with the embedded model)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from conftest import CORPUS

from tunelab.evaluate.loglik import MCItem

ROOT = Path(__file__).resolve().parents[1]


def parity_module():
    spec = importlib.util.spec_from_file_location("eval_parity", ROOT / "bench" / "eval_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_items(n: int, seed: int = 0) -> list[MCItem]:
    rng = random.Random(seed)
    words = " ".join(CORPUS).split()
    items = []
    for i in range(n):
        # lm-eval reads a context that renders as a bare number as an index, so every context starts with a word.
        context = "Text: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        if i % 3 == 0:
            context = f"Question: {context}\nAnswer:"
        choices = [" " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(2, 5))]
        items.append(MCItem(context, choices, rng.randrange(len(choices))))
    return items


@pytest.mark.timeout(300)
def test_tunelab_matches_lm_eval_on_the_same_items(tiny_model_dir: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -e .[test]")
    from tunelab.evaluate.runner import load_eval_model

    bench = parity_module()
    items = make_items(24)
    model, tokenizer = load_eval_model(str(tiny_model_dir))
    ours, our_lls, _ = bench.run_tunelab(items, model, tokenizer, batch_size=5)
    theirs, their_lls, _ = bench.run_lm_eval(items, str(tiny_model_dir), batch_size=5)
    assert [len(r) for r in our_lls] == [len(r) for r in their_lls]
    for mine, ref in zip(our_lls, their_lls):
        assert mine == pytest.approx(ref, abs=1e-3)
    assert ours["acc"] == pytest.approx(theirs["acc"])
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm"])
