"""tunelab: fine-tune pre-trained language models from one YAML file.

    import tunelab
    cfg = tunelab.load_config("configs/demo.yaml", ["training.epochs=1"])
    result = tunelab.train(cfg)
    model, tokenizer = tunelab.load_for_inference(result.run_dir)
    print(tunelab.generate(model, tokenizer, ["Hello!"]))
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os

# oneDNN (torch's CPU matmuls) keeps up to 1024 compiled kernels, one per matmul shape; micro-batches of varying length
# make new shapes every step, so the cache only grew: 128 kept the speed and cut a SmolLM2-135M LoRA run's peak RSS by
# ~260 MB. Read when oneDNN first runs, so setting it at import works; a value the user set wins.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
# Tensors of 2 MB and more on transparent huge pages (torch's CPU allocator asks for them with madvise): a training step
# allocates and frees hundreds of MB of activations, and faulting them in 4 KB at a time cost ~2 us per page here, a
# 67 MB logits chunk 30 ms of its 40 ms. A SmolLM2-135M LoRA micro-batch on one core ran 20% faster. torch reads this
# once, at its first allocation, so it only takes effect when tunelab is imported before torch (as the CLI does).
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import tunelab.train as _train_package  # noqa: F401
from tunelab.config import RunConfig, load_config
from tunelab.errors import TunelabError

# The subpackage tunelab.train is imported above, before the function below takes its name: Python binds a subpackage
# to its parent's attribute only when it is first imported, so a later `import tunelab.train.loss` anywhere cannot
# replace the function `tunelab.train` with the module.


def train(config, overrides: list[str] | None = None, resume: bool | str | None = None, quiet: bool = False, on_eval=None):
    """Run a fine-tune from a RunConfig, a YAML path or a dict; returns a TrainResult(run_dir, summary).

    `on_eval(step, eval_loss)` is called after each periodic evaluation; raising from it stops the run (pruning)."""
    from tunelab.train.loop import train as _train

    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    return _train(cfg, resume=resume, quiet=quiet, on_eval=on_eval)


def load_for_inference(target):
    from tunelab.generate import load_for_inference as _load

    return _load(target)


def generate(model, tokenizer, prompts, **kwargs):
    from tunelab.generate import generate as _generate

    return _generate(model, tokenizer, prompts, **kwargs)


__all__ = ["RunConfig", "TunelabError", "generate", "load_config", "load_for_inference", "train"]
