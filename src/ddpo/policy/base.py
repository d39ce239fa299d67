"""What every policy shares: the trained network (a UNet or a transformer) with LoRA adapters or all weights
trainable, frozen text encoders and VAE, the trainable state, diffusers-format saving, and the reference model
(the same network with its adapters disabled) for KL regularisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Protocol

import torch

if TYPE_CHECKING:
    from ddpo.core.trajectory import StepPrediction, Trajectory

DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


@dataclass
class LoraOptions:
    enabled: bool = True
    rank: int = 4
    alpha: float = 4.0
    target_modules: Sequence[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


class TrainablePolicy(Protocol):
    """What the trainer asks of a policy (`ddpo.training`): sample chains, predict at their steps with gradients,
    expose and save the trained weights. Every family adapter (`DiffusionPolicy` and its subclasses) is one."""

    model: torch.nn.Module  # the trained network
    denoiser: torch.nn.Module  # the network as the accelerator wraps it (DDP, FSDP, DeepSpeed)

    def sample(self, prompts: list[str], generators: list[torch.Generator], metadata: list[dict] | None = None, **options: Any) -> Trajectory:
        """Chains for `prompts`, sample i's randomness from `generators[i]`, with log-probs and decoded images."""
        ...

    def predict(self, trajectory: Trajectory, step_indices: torch.Tensor, *, reference: bool = False) -> StepPrediction:
        """The policy at steps (B, K) of `trajectory`, with gradients through the trainable weights."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def save_adapter(self, directory: str | Path, network_state: dict[str, torch.Tensor] | None = None, adapter_state: dict[str, torch.Tensor] | None = None) -> None:
        """The trained weights in diffusers' format (`pipe.load_lora_weights(directory)` loads a LoRA)."""
        ...

    def evaluation(self) -> ContextManager[None]:
        """Sample with the evaluation settings (e.g. `sample.eval_num_steps`) inside the block."""
        ...


def encode_each_distinct(prompts: Sequence[str], encode_one: Callable[[str], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Encode each distinct prompt once, on its own, and return the outputs in the order of `prompts`.

    A batched text-encoder call's floats depend on the batch's size (measured on the Shapes model: 6e-8 between
    batches of 2 and 4 copies of one prompt, 3e-5 in the latents after 6 steps), which would make a sample depend
    on the batch it was drawn in, and a 2-process run differ from a 1-process run with the same global batch.
    `encode_one(prompt)` returns a tuple of tensors with a leading batch dimension of 1.
    """
    distinct = list(dict.fromkeys(prompts))
    outputs = [encode_one(prompt) for prompt in distinct]
    position = {prompt: k for k, prompt in enumerate(distinct)}
    index = [position[prompt] for prompt in prompts]
    return tuple(torch.cat(parts)[index] for parts in zip(*outputs))


def pad_states(states: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, L, D) text states of one prompt -> (1, length, D) states, zero after the L tokens, and the (1, length)
    int64 mask of the L tokens: families whose prompts have their own lengths (Qwen-Image, Z-Image) store them so,
    and trajectories of any batch concatenate."""
    padded = states.new_zeros(1, length, states.shape[2])
    padded[:, : states.shape[1]] = states
    mask = torch.zeros(1, length, dtype=torch.long, device=states.device)
    mask[:, : states.shape[1]] = 1
    return padded, mask


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to `device`; cast only when the dtype differs (diffusers warns on every cast)."""
    module.to(device)
    if module.dtype != dtype:
        module.to(dtype=dtype)


class DiffusersPolicy:
    """The trainable part of a policy over a diffusers pipeline.

    `model` is the pipeline's denoising network (`pipeline.<network_name>`); it is frozen except for LoRA
    adapters (or fully trainable when `lora.enabled` is False); the `frozen` modules (VAE, text encoders) are
    always frozen. `denoiser` is what `log_prob` calls: the trainer may replace it with the same network wrapped
    for distributed training (sampling and the reference model, which need no gradient synchronisation, always
    call the bare `model`).

    Subclasses set `network_name` ("unet" or "transformer") and `convert_lora_to_diffusers` (how the pipeline's
    own training scripts save their LoRA: SD's converts peft names to diffusers', SD3's and FLUX's do not).
    """

    network_name = "unet"
    convert_lora_to_diffusers = True

    def __init__(
        self,
        pipeline,
        lora: LoraOptions | None,
        *,
        frozen: Sequence[torch.nn.Module],
        gradient_checkpointing: bool = False,
        device: torch.device | str = "cpu",
        inference_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.pipeline = pipeline
        self.lora = lora or LoraOptions()
        self.device = torch.device(device)
        self.model: torch.nn.Module = getattr(pipeline, self.network_name)
        # Dropout off everywhere (as `from_pretrained` leaves modules): a log-prob recomputed in training must
        # equal the one recorded while sampling.
        self.model.eval()
        for module in frozen:
            _place(module.eval().requires_grad_(False), self.device, inference_dtype)
        self.model.requires_grad_(False)
        if self.lora.enabled:
            from peft import LoraConfig

            # Frozen base weights may sit in half precision; the adapters train in fp32.
            _place(self.model, self.device, inference_dtype)
            config = LoraConfig(
                r=self.lora.rank,
                lora_alpha=self.lora.alpha,
                init_lora_weights="gaussian",
                target_modules=list(self.lora.target_modules),
            )
            self.model.add_adapter(config)
            for parameter in self.model.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        else:
            _place(self.model.requires_grad_(True), self.device, torch.float32)
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.denoiser: Callable[..., object] = self.model

    # ---- parameters and saving --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors by parameter name (exact fp32 copies: what a checkpoint needs to resume)."""
        return {name: p.detach().cpu().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        parameters = dict(self.model.named_parameters())
        missing = [name for name, p in parameters.items() if p.requires_grad and name not in state]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]!r}")
        with torch.no_grad():
            for name, tensor in state.items():
                parameters[name].copy_(tensor)

    def save_adapter(self, directory: str | Path, network_state: dict[str, torch.Tensor] | None = None, adapter_state: dict[str, torch.Tensor] | None = None) -> None:
        """LoRA in diffusers' format (`pipe.load_lora_weights(directory)` loads it), else the whole network
        in `directory/<network_name>` (diffusers' `from_pretrained` format).

        `network_state` is the whole network's state dict when the trainer gathered it because the network's own
        parameters are only this process's shards (FSDP); it is then what is written, with the network's config.
        `adapter_state` (a LoRA's tensors by parameter name, e.g. `trainable_state_dict()`) is written instead of the
        live adapters: a copy taken earlier, so that a background writer never reads weights training changes.
        """
        directory = Path(directory)
        if network_state is not None:
            if self.lora.enabled:
                raise ValueError("save_adapter(network_state=...) writes a full fine-tune; this policy trains LoRA")
            _save_network(self.model, network_state, directory / self.network_name)
            return
        if self.lora.enabled:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(self.model, state_dict=adapter_state)
            if self.convert_lora_to_diffusers:
                layers = convert_state_dict_to_diffusers(layers)
            # The adapter config travels with the weights: without it, load_lora_weights assumes alpha = rank.
            metadata = self.model.peft_config["default"].to_dict()
            type(self.pipeline).save_lora_weights(
                directory,
                **{f"{self.network_name}_lora_layers": layers, f"{self.network_name}_lora_adapter_metadata": metadata},
                safe_serialization=True,
            )
        else:
            self.model.save_pretrained(directory / self.network_name, safe_serialization=True)

    # ---- the reference model ----------------------------------------------------------------------------
    @contextmanager
    def reference_model(self) -> Iterator[torch.nn.Module]:
        """The base model: `model` with its LoRA adapters disabled, re-enabled on exit (even after an error).

        Raises:
            ValueError: the policy trains all weights, so there is no base model left to compare with.
        """
        if not self.lora.enabled:
            raise ValueError("the reference (base) model needs LoRA (model.use_lora=true): with full fine-tuning the base weights are gone")
        self.model.disable_adapters()
        try:
            yield self.model
        finally:
            self.model.enable_adapters()

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Sample as evaluation does. Policies whose evaluation sampler differs from the training one (the
        flow policies' deterministic ODE) switch inside this block; the DDIM policy evaluates as it trains."""
        yield


def _save_network(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """`model.save_pretrained(directory)` with the weights of `state`: config.json and safetensors shards of at
    most 10 GB with diffusers' names. FSDP2 makes the sharded model an instance of a class "FSDP<name>", so the
    config names the class it was built from."""
    import json

    from huggingface_hub import save_torch_state_dict
    from torch.distributed.fsdp import FSDPModule

    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads(model.to_json_string())
    config["_class_name"] = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_torch_state_dict(state, directory, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")
