"""Distillation on the embedded model: a LoRA teacher fine-tuned on the demo tickets, then a fresh LoRA student distilled
from it; prints KL(teacher || model) at T=1 per trained token on the 40 held-out validation rows, for the base model and
the student (README: Distillation).

    python bench/distill_kl.py [STUDENT_STEPS=30] [WORK_DIR=runs/bench-distill]     # ~13 min on 2 CPU cores
"""
import json
import sys
import time
from pathlib import Path

import torch

from tunelab import load_config, train
from tunelab.data.dataset import prepare_data
from tunelab.generate import load_for_inference
from tunelab.methods.distill import DistillObjective, load_teacher
from tunelab.models.loading import load_model, load_tokenizer, resolve_model
from tunelab.train.loop import loss_totals

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
root = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "runs" / "bench-distill"
data = {"train": str(ROOT / "src/tunelab/demo/data/train.jsonl"),
        "validation": str(ROOT / "src/tunelab/demo/data/validation.jsonl"),
        "format": "prompt_response", "max_length": 256}
common = {"batch_size": 8, "learning_rate": 2e-3, "seed": 0, "eval_at_start": True, "precision": "fp32"}
t0 = time.time()
teacher_run = root / "teacher"
if not (teacher_run / "summary.json").is_file():
    train(load_config({"model": "default", "data": data, "method": {"name": "lora", "r": 16, "alpha": 32},
                       "training": {**common, "max_steps": 40, "eval_every": 40},
                       "output": {"dir": str(teacher_run), "overwrite": True}}), quiet=True)
print("teacher", json.loads((teacher_run / "summary.json").read_text())["final_eval_loss"], round(time.time() - t0), "s", flush=True)

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
student_run = root / "student"
t1 = time.time()
res = train(load_config({"model": "default", "data": data,
                         "method": {"name": "distill", "teacher": str(teacher_run), "alpha": 0.5, "temperature": 2.0,
                                    "adapter": {"name": "lora", "r": 8, "alpha": 16}},
                         "training": {**common, "max_steps": steps, "eval_every": steps},
                         "output": {"dir": str(student_run), "overwrite": True}}), quiet=True)
print("student", res.summary["final_eval_loss"], round(time.time() - t1), "s", flush=True)

source = resolve_model("default")
tok = load_tokenizer(source)
val = prepare_data(load_config({"data": data}).data, tok, 0, base=source).validation
teacher = load_teacher(str(teacher_run), tok)
kl1 = DistillObjective(teacher, alpha=0.0, temperature=1.0)
dev = torch.device("cpu")
for name, model in [("base", load_model(source).eval()), ("student", load_for_inference(student_run)[0])]:
    stats = {"ce": 0.0, "kl": 0.0}
    total, n = loss_totals(model, val, 8, tok.pad_token_id, dev, None, kl1, stats)
    print(f"{name}: KL(teacher||{name}) at T=1 = {stats['kl'] / n:.4f} nats/token, CE = {stats['ce'] / n:.4f} ({n} tokens)", flush=True)
stats = {"ce": 0.0, "kl": 0.0}
loss_totals(teacher, val, 8, tok.pad_token_id, dev, None, kl1, stats)
print(f"teacher CE = {stats['ce'] / n:.4f}")
