"""One epoch of each flow algorithm (DiffusionNFT, AWM, MixGRPO and GRPO-Guard included) end to end through the CLI on tiny random SD3, FLUX and UNet-flow pipelines:
the run finishes, its metrics are finite, and the saved LoRA loads into the diffusers pipeline and changes it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import cli_args

from ddpo.cli import main

ALGORITHM_OVERRIDES = {
    "flow_grpo": {"train.kl_weight": 0.04, "sample.eval_num_steps": 4},
    "fdfo": {"sample.guidance_scale": 1.0, "train.spo_epsilon": 3e-2, "train.cfg": "false"},
    "ddpo_is": {"train.clip_range": 1e-2},
    "diffusion_nft": {"sample.guidance_scale": 1.0, "train.cfg": "false"},
    "awm": {"sample.guidance_scale": 1.0, "train.cfg": "false", "train.clip_range": 1.0},
    "mix_grpo": {"sample.sde_window": 2, "train.clip_range": 1e-2},
    "grpo_guard": {"train.clip_range": 1e-2},
}
RUNS = [("sd3", "flow_grpo"), ("sd3", "fdfo"), ("flux", "flow_grpo"), ("flux", "fdfo"), ("sd-flow", "fdfo"), ("sd3", "ddpo_is"),
        ("sd3", "diffusion_nft"), ("sd3", "awm"), ("flux", "mix_grpo"), ("sd3", "grpo_guard")]


@pytest.fixture(scope="session")
def tiny_flow_dirs(tmp_path_factory):
    from ddpo.policy.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-flow")
    return {kind: save_tiny_pipeline(root / kind, kind=kind) for kind in ("sd3", "flux", "sd-flow")}


def train_one_epoch(model_dir, out, algorithm: str, **extra):
    values = {
        "train.algorithm": algorithm, "train.epochs": 1, "train.lr": 1e-2, "sample.num_steps": 3,
        "sample.samples_per_prompt": 2, **ALGORITHM_OVERRIDES[algorithm], **extra,
    }  # fmt: skip
    result = CliRunner().invoke(main, cli_args(model_dir, out, **values), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def diffusers_images(kind: str, pipe) -> np.ndarray:
    """The diffusers pipeline's own sampler, 3 steps, fixed seed."""
    generator = torch.Generator().manual_seed(0)
    extra = {"max_sequence_length": 16} if kind in ("sd3", "flux") else {}
    return pipe(["a cat"], num_inference_steps=3, height=32, width=32, guidance_scale=2.0, generator=generator, output_type="np", **extra).images


@pytest.mark.parametrize(("kind", "algorithm"), RUNS)
def test_one_epoch_runs_and_saves_a_lora_the_diffusers_pipeline_loads(tiny_flow_dirs, tmp_path, kind, algorithm):
    import diffusers

    from ddpo.policy import SamplingOptions, load_pipeline, sampling_policy

    run = tmp_path / "run"
    (record,) = train_one_epoch(tiny_flow_dirs[kind], run, algorithm)
    assert record["epoch"] == 1 and record["samples"] == 8
    assert all(np.isfinite(record[key]) for key in ("reward_mean", "loss", "approx_kl", "grad_norm"))
    if algorithm == "flow_grpo":
        # The policy moved away from the reference after the first optimizer step: its KL is positive, and small.
        assert 0 < record["kl_to_reference"] < 1
    checkpoint = run / "checkpoints" / "epoch-0001"
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()

    if kind == "sd-flow":  # StableDiffusionPipeline.__call__ assumes a DDIM-family scheduler: sample its ODE with ours
        def images(pipe):
            policy = sampling_policy(pipe, SamplingOptions(num_steps=3, guidance_scale=2.0, height=32, width=32))
            return np.stack([np.asarray(image) for image in policy.sample(["a cat"], [torch.Generator().manual_seed(0)]).images])
    else:
        def images(pipe):
            return diffusers_images(kind, pipe)

    pipe = load_pipeline(str(tiny_flow_dirs[kind]))
    before = images(pipe)
    pipe.load_lora_weights(checkpoint)
    assert type(pipe) is getattr(diffusers, type(pipe).__name__)
    after = images(pipe)
    assert np.abs(after.astype(float) - before.astype(float)).max() > 1e-3


def test_flow_grpo_fast_trains_only_the_steps_of_each_samples_sde_window(tiny_flow_dirs, tmp_path, monkeypatch):
    """sample.sde_window=2 of 6 steps: every step the trainer recomputes has a finite recorded log-prob (it lies in
    its sample's SDE window), 2 per sample (timestep_fraction 1), and the epoch's metrics are written, finite."""
    from ddpo.policy.flow import FlowMatchingPolicy

    trained = []
    original = FlowMatchingPolicy.predict

    def spy(self, trajectory, step_indices, **kwargs):
        trained.append(trajectory.log_probs.gather(1, step_indices.to(trajectory.log_probs.device)))
        return original(self, trajectory, step_indices, **kwargs)

    monkeypatch.setattr(FlowMatchingPolicy, "predict", spy)
    (record,) = train_one_epoch(tiny_flow_dirs["sd-flow"], tmp_path / "run", "flow_grpo", **{"sample.num_steps": 6, "sample.sde_window": 2})
    assert record["epoch"] == 1 and record["samples"] == 8
    assert all(np.isfinite(record[key]) for key in ("reward_mean", "loss", "approx_kl", "grad_norm", "kl_to_reference"))
    recorded = torch.cat([t.reshape(-1) for t in trained])  # one entry per (sample, trained step), whatever the chunks
    assert recorded.numel() == 8 * 2 and torch.isfinite(recorded).all()


@pytest.fixture(scope="module")
def flow_grpo_run(tiny_flow_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("flow-runs") / "flow-grpo"
    train_one_epoch(tiny_flow_dirs["sd-flow"], run, "flow_grpo", **{"sample.eval_num_steps": 5})
    return run


def test_the_sample_command_draws_a_flow_model_with_its_lora(tiny_flow_dirs, flow_grpo_run, tmp_path):
    from PIL import Image

    run = flow_grpo_run
    base, tuned = tmp_path / "base.png", tmp_path / "tuned.png"
    common = ["sample", "--model", str(tiny_flow_dirs["sd-flow"]), "--prompt", "a cat", "-n", "2", "--steps", "4", "--guidance", "2"]
    assert CliRunner().invoke(main, [*common, "--out", str(base)]).exit_code == 0
    assert CliRunner().invoke(main, [*common, "--lora", str(run), "--out", str(tuned)]).exit_code == 0
    a, b = np.asarray(Image.open(base), dtype=float), np.asarray(Image.open(tuned), dtype=float)
    assert a.shape == b.shape == (32, 64, 3)
    assert np.abs(a - b).max() > 0


def test_eval_scores_a_flow_run_with_its_ode_and_eval_steps(flow_grpo_run, tmp_path, monkeypatch):
    from ddpo.policy.flow import FlowMatchingPolicy

    steps_sampled = []
    original = FlowMatchingPolicy.sample

    def spy(self, prompts, generators, *args, **kwargs):
        trajectory = original(self, prompts, generators, *args, **kwargs)
        steps_sampled.append((self.sampling.sampler, trajectory.num_steps))
        return trajectory

    monkeypatch.setattr(FlowMatchingPolicy, "sample", spy)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(flow_grpo_run), "--seeds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"base", "epoch-0001"}
    assert set(steps_sampled) == {("ode", 5)}  # sample.eval_num_steps, deterministic
    base, tuned = report["models"]["base"]["groups"]["all"], report["models"]["epoch-0001"]["groups"]["all"]
    assert base["jpeg_compressibility"] != tuned["jpeg_compressibility"]


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize(("algorithm", "lr"), [("fdfo", 1e-2), ("flow_grpo", 3e-2)])
def test_the_algorithms_move_the_policy_the_way_the_reward_points(algorithm, lr, sign):
    """15 epochs of 8 prompts x 2 on the tiny flow policy, rewarded for a large (sign +1) or small (-1) mean of
    latent channel 0: the deterministic ODE samples of 32 held-out seeds move that way (measured: FDFO
    -0.005 -> +0.22 / -0.17, Flow-GRPO -0.005 -> +0.07 / -0.37). Policy, algorithm and loss as the trainer
    wires them, without images (a random VAE decodes everything alike)."""
    from ddpo.algorithms import ALGORITHMS, build_algorithm
    from ddpo.policy import LoraOptions, UNetFlowPolicy
    from ddpo.policy.flow import FlowSamplingOptions
    from ddpo.policy.tiny import build_tiny_pipeline

    torch.manual_seed(0)
    sampling = FlowSamplingOptions(num_steps=4, guidance_scale=1.0, height=32, width=32, sampler=ALGORITHMS[algorithm].sampler, churn=0.01)
    policy = UNetFlowPolicy(build_tiny_pipeline(flow=True), sampling, LoraOptions(rank=4, alpha=4.0), train_cfg=False)
    options = {"epsilon": 3e-2} if algorithm == "fdfo" else {"clip_range": 1e-2, "adv_clip_max": 5.0}
    trainer = build_algorithm(algorithm, **options)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=lr)

    def held_out_score() -> float:
        with policy.evaluation():
            trajectory = policy.sample(["a cat", "a dog"] * 16, [torch.Generator().manual_seed(99_999 + i) for i in range(32)], decode=False)
        return trajectory.latents[:, -1, 0].mean().item()

    before = held_out_score()
    n, steps = 16, torch.arange(4).expand(16, -1)
    for epoch in range(15):
        prompts = [["a cat", "a dog", "an otter", "a horse"][(i // 2) % 4] for i in range(n)]
        initial = [torch.Generator().manual_seed(1000 * epoch + 500 + i // 2) for i in range(n)] if trainer.shared_initial_noise else None
        trajectory = policy.sample(prompts, [torch.Generator().manual_seed(1000 * epoch + i) for i in range(n)], decode=False, initial_noise_generators=initial)
        trainer.prepare(trajectory)
        advantages = trainer.advantages(sign * trajectory.latents[:, -1, 0].mean(dim=(1, 2)), prompts)
        for _ in range(2):
            log_prob, old_log_prob = trainer.log_likelihoods(policy.predict(trajectory, steps), trajectory, torch.arange(n)[:, None], steps)
            loss = trainer.loss(log_prob.reshape(-1), old_log_prob.reshape(-1), advantages.repeat_interleave(4)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert sign * (held_out_score() - before) > 0.05
