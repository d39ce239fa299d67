"""Over-optimization monitor: the trainer's periodic evaluation, and early stopping on the held-out score.

Every `log.eval_every` epochs (and before training) the policy samples fixed prompts x fixed seeds
(`ddpo.training.evaluate`); the samples are scored by the training reward and by a held-out scorer that training never
sees (`log.heldout_reward`; the Shapes world's judge by default). The paper found its rewards over-optimized
eventually (Black et al. 2023, "overoptimization"): the training reward keeps rising while what it stood for
falls. The held-out score shows that turn; the KL between the fine-tuned and the base policy along the
sampled chains shows how far the policy has moved, and the diversity among same-prompt samples shows mode
collapse. Each evaluation is one line of RUN_DIR/monitor.jsonl:

    epoch, samples, seconds, reward_name, heldout_reward,
    train_reward[_on_trained|_on_heldout]     the training reward on the evaluation samples
    heldout_score[_on_trained|_on_heldout]    the held-out scorer's (absent without one)
    kl[_on_trained|_on_heldout]               sum over steps of the per-dimension KL to the base (LoRA only)
    diversity[_on_trained|_on_heldout]        mean pairwise RMS pixel distance among a prompt's samples

`_on_trained` / `_on_heldout` restrict to the trained / held-out prompts; no suffix means all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ddpo.config import Config
from ddpo.training.assemble import heldout_reward_name
from ddpo.training.evaluate import HELDOUT, TRAINED, eval_prompts_of, evaluate_policy
from ddpo.rewards import CheckedReward, build_reward

EARLY_STOP_METRIC = "heldout_score"
SUFFIXES = {"all": "", TRAINED: "_on_trained", HELDOUT: "_on_heldout"}


@dataclass
class BestEpoch:
    epoch: int
    score: float


class Monitor:
    """Evaluates a policy on the run's fixed evaluation set and keeps the early-stopping state."""

    def __init__(self, config: Config, training_reward: CheckedReward) -> None:
        self.config = config
        self.eval_prompts = eval_prompts_of(config, limit=config.log.eval_num_prompts)
        self.training_reward = training_reward
        name = heldout_reward_name(config)
        self.heldout_reward = build_reward(name) if name is not None else None
        self.best: BestEpoch | None = None

    def due(self, epoch: int) -> bool:
        every = self.config.log.eval_every
        return every > 0 and epoch % every == 0

    def evaluate(self, policy, epoch: int, samples: int) -> dict:
        """One monitor.jsonl record (see the module docstring) for the policy after `epoch` epochs."""
        started = time.perf_counter()
        rewards = {"train_reward": self.training_reward}
        if self.heldout_reward is not None:
            rewards["heldout_score"] = self.heldout_reward
        summary = evaluate_policy(
            policy, self.eval_prompts, rewards, self.config.log.num_eval_seeds, self.config.sample.batch_size,
            with_kl=self.config.model.use_lora,
        )  # fmt: skip
        record: dict = {
            "epoch": epoch,
            "samples": samples,
            "reward_name": self.training_reward.name,
            "heldout_reward": self.heldout_reward.name if self.heldout_reward is not None else None,
        }
        for group, values in summary["groups"].items():
            for key in ("train_reward", "heldout_score", "kl", "diversity"):
                if key in values:
                    record[key + SUFFIXES[group]] = values[key]
        record["seconds"] = round(time.perf_counter() - started, 3)
        return record

    # ---- early stopping ---------------------------------------------------------------------------------
    def observe(self, record: dict) -> bool:
        """Track the best held-out score of a trained epoch (the model before training, epoch 0, is the
        baseline, not a candidate: it has no checkpoint); True when `record` is a new best (strictly higher)."""
        score = record.get(EARLY_STOP_METRIC)
        if score is None or record["epoch"] < 1:
            return False
        if self.best is None or score > self.best.score:
            self.best = BestEpoch(record["epoch"], score)
            return True
        return False

    def should_stop(self, epoch: int) -> bool:
        """`train.early_stop_on_heldout` and no new best for `train.early_stop_patience` epochs."""
        train = self.config.train
        return train.early_stop_on_heldout and self.best is not None and epoch - self.best.epoch >= train.early_stop_patience

    def restore(self, records: list[dict]) -> None:
        """Early-stopping state of a resumed run, from its monitor.jsonl records."""
        self.best = None
        for record in records:
            self.observe(record)


def tracker_metrics(record: dict) -> dict[str, float]:
    """eval/... names of a monitor record's numbers, for the trackers."""
    skip = {"epoch", "samples"}
    return {f"eval/{key}": value for key, value in record.items() if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)}
