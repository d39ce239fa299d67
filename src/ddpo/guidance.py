"""RL guidance at inference (RLG, arXiv 2508.21016): sample with a mix of the base and the fine-tuned model's
predictions, out = base + s * (fine-tuned - base), without retraining. s = 0 is the base model, s = 1 the
fine-tuned one, s > 1 extrapolates past it; the scale acts like the inverse of a KL coefficient.

The mix is taken at every call of the denoising network, so it composes with classifier-free guidance (which is
linear in the network's outputs) and with any sampler: `rl_guidance(policy, s)` swaps the policy's network for a
`GuidedNetwork` while sampling and puts it back after. It needs a LoRA (the base model is the same network with
its adapters disabled).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch


class GuidanceError(ValueError):
    """RL guidance asked of a model without a LoRA (no base model to mix with)."""


class GuidedNetwork(torch.nn.Module):
    """A LoRA network called twice, adapters disabled and enabled, returning base + scale * (fine-tuned - base)
    in the same output type (the `.sample` of diffusers' output classes, or a tensor)."""

    def __init__(self, network: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.network = network
        self.scale = float(scale)

    def forward(self, *args, **kwargs):
        if self.scale == 1.0:
            return self.network(*args, **kwargs)
        self.network.disable_adapters()
        try:
            base = self.network(*args, **kwargs)
        finally:
            self.network.enable_adapters()
        if self.scale == 0.0:
            return base
        tuned = self.network(*args, **kwargs)
        base_out, tuned_out = _prediction(base), _prediction(tuned)
        mixed = base_out + self.scale * (tuned_out - base_out)
        if isinstance(base, torch.Tensor):
            return mixed
        if isinstance(base, tuple):
            return (mixed, *base[1:])
        return replace(base, sample=mixed) if hasattr(base, "__dataclass_fields__") else type(base)(sample=mixed)

    # What the samplers read from the network besides calling it.
    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    @property
    def config(self):
        return self.network.config

    @property
    def device(self) -> torch.device:
        return self.network.device


def _prediction(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def has_adapters(network: torch.nn.Module) -> bool:
    return bool(getattr(network, "peft_config", None))


@contextmanager
def rl_guidance(policy, scale: float) -> Iterator[None]:
    """Within the block, `policy.sample` mixes base and fine-tuned predictions with `scale`.

    Raises:
        GuidanceError: the policy's network has no LoRA adapters (no base model to mix with).
    """
    names = [name for name in ("unet", "transformer", "model") if isinstance(getattr(policy, name, None), torch.nn.Module)]
    network = getattr(policy, names[0]) if names else None
    if network is None or not has_adapters(network):
        raise GuidanceError("RL guidance (--rl-scale) mixes a base model with a fine-tuned LoRA: give a run or checkpoint with LoRA weights")
    guided = GuidedNetwork(network, scale)
    saved = {name: getattr(policy, name) for name in names}
    try:
        for name in names:
            if saved[name] is network:
                setattr(policy, name, guided)
        yield
    finally:
        for name, value in saved.items():
            setattr(policy, name, value)
