"""Run by tests/test_distributed.py under `accelerate launch`: two epochs, dumping what the test compares."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from helpers import tiny_overrides
from safetensors.torch import save_file

from ddpo.training.assemble import load_config
from ddpo.training.loop import Trainer


def main(model_dir: str, prompt_file: str, out: str, batch_size: int, extra: dict | None = None) -> None:
    overrides = tiny_overrides(
        model_dir,
        **{
            "sample.batch_size": batch_size,
            "train.batch_size": batch_size,
            "prompts.source": '"file"',
            "prompts.file": f'"{prompt_file}"',
            "train.stat_min_count": 3,
            "train.lr": 1e-2,
            # Adam's first steps move every weight by about lr * sign(gradient), so a weight whose gradient is ~1e-10
            # (float rounding of a sum taken in another order) would jump by +-lr; an epsilon above that noise keeps
            # the comparison of 1- and 2-process weights about the gradients, not about rounding.
            "train.adam_epsilon": 1e-4,
            **(extra or {}),  # e.g. another algorithm (tests/test_distributed_flow.py)
        },
    )
    config = load_config("sd_compressibility", overrides)
    trainer = Trainer(config, Path(out) / "run", progress=False)
    rank = trainer.accelerator.process_index
    advantages = {}
    for epoch in (1, 2):
        samples = trainer.sample_epoch(epoch)
        epoch_advantages = trainer.advantages(samples)
        for index, prompt, advantage in zip(samples.indices.tolist(), samples.trajectory.prompts, epoch_advantages.tolist()):
            advantages[f"{epoch}/{index}"] = {"prompt": prompt, "advantage": advantage}
        metrics, seconds = trainer.update(epoch, samples, epoch_advantages)
        trainer.record(epoch, samples, metrics, seconds)
    (Path(out) / f"advantages-rank{rank}.json").write_text(json.dumps(advantages))
    save_file(trainer.policy.trainable_state_dict(), str(Path(out) / f"lora-rank{rank}.safetensors"))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5]) if len(sys.argv) > 5 else None)
