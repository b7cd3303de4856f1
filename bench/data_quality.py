"""Corrupt a real dataset by hand-like edits, then show that `data check` names every corrupted line and that
`data prepare` removes every planted duplicate and PII item, with 70/15/15 splits and no near twin across splits.

    python bench/data_quality.py                 # ../shared/data/alpaca_en_demo.json (else the demo data)
    python bench/data_quality.py --data my.jsonl --seed 3

Planted (each at a random line): malformed JSON, rows missing a required field, whitespace-only fields, wrong types,
exact duplicates (re-cased, re-spaced), near duplicates (one word changed in a long row), e-mails, phone numbers,
credit-card numbers (Luhn-valid, three layouts), IBANs and IP addresses. Prints planted vs found per kind; exits 1
if anything planted was missed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"

EMAILS = ["maria.lopez@example.com", "j.smith+orders@mail.example.org", "support-team@acme.co.uk", "kim_98@uni.example.edu"]
PHONES = ["+1 415 555 2671", "(555) 123-4567", "555-987-6543", "+44 20 7946 0958", "+49 30 901820"]
CARDS = ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005", "4012888888881881"]
IBANS = ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "FR1420041010050500013M02606"]
IPS = ["192.168.10.44", "10.0.3.7", "2001:db8:85a3::8a2e:370:7334"]


def plant(rows: list[dict], rng: random.Random, n: int) -> tuple[list[str], dict]:
    """Return the corrupted file's lines and what was planted where (1-based lines)."""
    keys = list(rows[0])
    text_key = "instruction" if "instruction" in rows[0] else keys[0]
    answer_key = "output" if "output" in rows[0] else keys[-1]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    planted: dict = {"invalid": {}, "exact": [], "near": [], "pii": []}

    def insert(line: str) -> int:
        at = rng.randrange(len(lines) + 1)
        lines.insert(at, line)
        return at

    inserted: list[tuple[str, str, object]] = []
    for i in range(n):
        inserted.append((f"bad-json-{i}", '{"' + text_key + '": "unterminated, ' + answer_key + '": }', "malformed JSON"))
        inserted.append((f"missing-{i}", json.dumps({text_key: f"question {i} with no answer"}), f"{answer_key}: missing field"))
        inserted.append((f"blank-{i}", json.dumps({text_key: "   ", answer_key: f"answer {i}"}), f"{text_key}: empty"))
        inserted.append((f"type-{i}", json.dumps({text_key: ["not", "a", "string"], answer_key: "x"}), "expected a string"))
    def n_words(row: dict) -> int:
        return sum(len(v.split()) for v in row.values() if isinstance(v, str))

    long_rows = sorted(rows, key=n_words)[-max(len(rows) // 4, 1):]  # one changed word is a near twin only in long rows
    for i in range(n):
        src = rng.choice(rows)
        dup = {k: (v.upper() + "  " if k == text_key and isinstance(v, str) else v) for k, v in src.items()}
        inserted.append((f"exact-{i}", json.dumps(dup, ensure_ascii=False), ("exact", json.dumps(src, ensure_ascii=False))))
        src = rng.choice(long_rows)
        longest = max((k for k, v in src.items() if isinstance(v, str)), key=lambda k: len(src[k]))
        words = src[longest].split(" ")
        j = rng.randrange(len(words))
        words[j] = "remarkably" if words[j] != "remarkably" else "notably"
        near = {**src, longest: " ".join(words)}
        inserted.append((f"near-{i}", json.dumps(near, ensure_ascii=False), ("near", json.dumps(src, ensure_ascii=False))))
    pii_items = [("email", v) for v in EMAILS] + [("phone", v) for v in PHONES] + [("credit_card", v) for v in CARDS]
    pii_items += [("iban", v) for v in IBANS] + [("ip", v) for v in IPS]
    for kind, value in pii_items:
        src = dict(rng.choice(rows))
        src[answer_key] = f"{src[answer_key]} For follow-up, use {value} (reference kept on file)."
        inserted.append((f"pii-{kind}", json.dumps(src, ensure_ascii=False), ("pii", kind, value)))

    for _, line, _ in inserted:
        insert(line)
    # Line numbers only settle once everything is in.
    where = {}
    for idx, line in enumerate(lines, start=1):
        where.setdefault(line, []).append(idx)
    for name, line, what in inserted:
        if isinstance(what, str):
            planted["invalid"][where[line].pop(0)] = what
        elif what[0] in ("exact", "near"):
            planted[what[0]].append((where[line][0], where[what[1]][0]))
        else:
            planted["pii"].append((what[1], what[2]))
    return lines, planted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA if DEFAULT_DATA.exists() else REPO / "src/tunelab/demo/data/train.jsonl"))
    parser.add_argument("--per-kind", type=int, default=10, help="How many of each invalid / duplicate kind to plant.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from tunelab.config import load_config
    from tunelab.data.check import check_files
    from tunelab.data.dedupe import cross_split_matches
    from tunelab.data.pipeline import example_text, run_pipeline, to_example
    from tunelab.data.readers import read_records

    rows = [r.row for r in read_records(args.data)]
    rng = random.Random(args.seed)
    lines, planted = plant(rows, rng, args.per_kind)
    work = Path(tempfile.mkdtemp(prefix="bench-data-quality-"))
    raw = work / "raw.jsonl"
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{args.data}: {len(rows)} rows -> {raw} with {len(lines)} lines", flush=True)

    missed = 0
    start = time.perf_counter()
    report = check_files([str(raw)])
    check_s = time.perf_counter() - start
    named = {p.line: p.text for p in report.problems}
    wrong = [line for line, what in planted["invalid"].items() if line not in named or what not in named[line]]
    extra = sorted(set(named) - set(planted["invalid"]))
    print(f"data check ({check_s:.1f} s): invalid planted {len(planted['invalid'])}, named {len(named)}, "
          f"missed/misnamed {len(wrong)}, named but not planted {len(extra)}")
    dup_lines = {int(r.rsplit(':', 1)[1]) for r, _, _ in report.duplicates}
    exact_missed = [p for p in planted["exact"] if not ({p[0], p[1]} & dup_lines)]
    print(f"  exact duplicates planted {len(planted['exact'])}, reported {len(report.duplicates)} (incl. ones already in the "
          f"data), planted missed {len(exact_missed)}")
    missed += len(wrong) + len(exact_missed)

    cfg = load_config({"data": {"train": str(raw), "format": None, "on_invalid": "skip", "clean": True, "pii": True,
                                "dedupe": {"exact": True, "near": True, "threshold": 0.85}, "split": {"seed": 1}}}).data
    start = time.perf_counter()
    result = run_pipeline(cfg, seed=0)
    prep_s = time.perf_counter() - start
    kept = {r.line for split in result.splits.values() for r in split}
    for kind in ("exact", "near"):
        both = [p for p in planted[kind] if p[0] in kept and p[1] in kept]
        print(f"data prepare: {kind} duplicates planted {len(planted[kind])}, both copies still present {len(both)}")
        missed += len(both)
    out_text = json.dumps([r.row for split in result.splits.values() for r in split], ensure_ascii=False)
    left = [(kind, value) for kind, value in planted["pii"] if value in out_text]
    print(f"  PII planted {len(planted['pii'])}, left in the output {len(left)} {left if left else ''}; found by type "
          f"{next(s for s in result.steps if s['step'] == 'pii')['found']}")
    missed += len(left)
    sizes = {k: len(v) for k, v in result.splits.items()}
    total = sum(sizes.values())
    targets = {"train": 0.70 * total, "validation": 0.15 * total, "test": 0.15 * total}
    off = max(abs(sizes[k] - targets[k]) for k in sizes)
    print(f"  splits {sizes} of {total}: largest distance from 70/15/15 = {off:.2f} rows")
    missed += off >= 1

    def texts(split: str) -> list[str]:
        return [example_text(to_example(r, result.format), with_system=False) for r in result.splits[split]]

    twins = cross_split_matches(texts("validation") + texts("test"), texts("train"), threshold=0.85)
    leaks = sum(t is not None for t in twins)
    print(f"  near twins across splits after prepare: {leaks}; pipeline {prep_s:.1f} s; removed {len(result.removed)} rows "
          f"({', '.join(f'{s} {sum(r.step == s for r in result.removed)}' for s in sorted({r.step for r in result.removed}))})")
    missed += leaks
    print("PASS: every planted problem found" if not missed else f"FAIL: {missed} planted problem(s) missed")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
