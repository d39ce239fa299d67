"""Training state that accelerate shards over the processes: DeepSpeed ZeRO-2 and FSDP2.

Under data parallelism (DDP) every process holds the whole network and the whole optimizer state, and the trainer
reads both directly. Under DeepSpeed ZeRO-2 each process holds 1/N of the optimizer state (the weights stay whole
on every process); under FSDP2 (`fully_shard`) each process holds 1/N of the weights too, and every forward pass
of the network is a collective that all-gathers one block's weights at a time. What changes for the trainer is
here: building the `Accelerator` (also on a machine without a GPU, where the tests run these recipes over gloo),
refusing what cannot work, and gathering / scattering the checkpointed state. Functions marked *collective* must
be called by every process.

Checkpoints name their optimizer-state layout (`OPTIMIZER_LAYOUTS`): "torch" (`optimizer.state_dict()`, DDP or
one process), "full-by-name" (FSDP: the whole state, keyed by parameter name) or "deepspeed-zero" (ZeRO's own
state, one entry per process, resumable with as many processes under DeepSpeed).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list

from ddpo.config import Config, ConfigError

OPTIMIZER_LAYOUTS = ("torch", "full-by-name", "deepspeed-zero")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def build_accelerator(**kwargs) -> Accelerator:
    """The run's `Accelerator`, as `accelerate launch` configured it, also on a machine with no GPU.

    accelerate (1.x) sets up a multi-process CPU group (gloo) only when told `cpu=True`, and then never uses
    DeepSpeed or FSDP. So without a GPU: under a DeepSpeed launch the gloo group is handed to DeepSpeed (its CPU
    accelerator communicates over gloo); under an FSDP launch the gloo group is set up first and presented as
    multi-GPU, the only kind accelerate turns FSDP on for (torch's `fully_shard` itself runs on CPU over gloo);
    otherwise `cpu=True` (plain data parallel). Without either, a `--num_processes 2` launch on a machine with no
    GPU would train 2 unsynchronised copies.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched or torch.cuda.is_available():
        return Accelerator(**kwargs)
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)
    if _env_flag("ACCELERATE_USE_FSDP"):
        PartialState(cpu=True)
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        return Accelerator(**kwargs)
    return Accelerator(cpu=True, **kwargs)


def end_training(accelerator: Accelerator, *, settle: bool = True) -> None:
    """`accelerator.end_training()` (trackers closed, process group destroyed) after the collectives have settled.

    gloo's worker threads free each finished collective, and a collective whose tensors Python owns needs the GIL to
    be freed; the DDP wrapper's reducer, freed with the trainer after the process group was destroyed, joins those
    threads while holding the GIL. A worker not yet done freeing then waits for the GIL forever and the process
    never exits (seen on a loaded 2-core machine: the requeued launch of a preempted 2-process run hung at its end).
    A last barrier, issued when nothing else is outstanding so that freeing it needs no GIL, and a pause without the
    GIL let every worker finish first. `settle=False` where some process may have stopped early (an error on one
    process): a barrier would wait for it forever."""
    if settle and accelerator.num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        time.sleep(0.5)
    accelerator.end_training()


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def check_and_configure(accelerator: Accelerator, config: Config) -> None:
    """Refuse launch configurations the trainer cannot run; fill DeepSpeed's config from the run's. Call before
    `accelerator.prepare`.

    DeepSpeed: ddpo runs its own gradient accumulation (one optimizer step per `train.gradient_accumulation_steps`
    x trained timesteps micro-steps, `Trainer.update`) and tells accelerate which micro-step ends an optimizer
    step (`accelerator.sync_gradients`, which accelerate passes to DeepSpeed's engine as the accumulation
    boundary). DeepSpeed's own `gradient_accumulation_steps` therefore stays 1 (above 1 its engine would divide
    each micro-step's loss again); its micro-batch is `train.batch_size` (bookkeeping: ddpo prepares no
    dataloader) and its gradient clipping is `train.max_grad_norm`.
    """
    if is_fsdp(accelerator):
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise ConfigError(
                f"FSDP version {plugin.fsdp_version}: ddpo supports FSDP2 only (fsdp_version: 2 in the accelerate config), "
                "whose fully_shard shards the network in place, so the sampler's calls to it gather its weights too"
            )
        if config.model.use_lora:
            raise ConfigError(
                "model.use_lora=true under FSDP: the FSDP recipes are for full fine-tunes (set model.use_lora=false); "
                "LoRA's trainable state is small, train it with DDP (multi_gpu.yaml) or DeepSpeed ZeRO-2 (deepspeed_zero2.yaml)"
            )
    if is_deepspeed(accelerator):
        plugin = accelerator.state.deepspeed_plugin
        if plugin.zero_stage == 3:
            raise ConfigError(
                "DeepSpeed ZeRO stage 3 partitions the weights, and ddpo samples with the unwrapped network; "
                "use zero_stage 2 (deepspeed_zero2.yaml), or FSDP (fsdp_sd3.yaml) to shard the weights of a full fine-tune"
            )
        ds = plugin.deepspeed_config
        steps = ds.get("gradient_accumulation_steps", "auto")
        if steps not in ("auto", 1):
            raise ConfigError(
                f"the DeepSpeed config sets gradient_accumulation_steps={steps}; set it to 1 and use "
                f"train.gradient_accumulation_steps (ddpo accumulates over minibatches and trained timesteps itself)"
            )
        ds["gradient_accumulation_steps"] = 1
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = config.train.batch_size
        ds["gradient_clipping"] = config.train.max_grad_norm


@dataclass
class CheckpointState:
    """What a checkpoint holds of the network and the optimizer, gathered to the main process."""

    trainable: dict[str, torch.Tensor]  # trainable tensors by parameter name, whole
    network: dict[str, torch.Tensor] | None  # the whole network's state dict where the network itself is sharded, else None
    optimizer: object
    optimizer_layout: str  # one of OPTIMIZER_LAYOUTS


def gather_checkpoint_state(accelerator: Accelerator, policy, optimizer) -> CheckpointState | None:
    """The checkpointed state on the main process, None on the others (*collective* under FSDP and DeepSpeed;
    with DDP only the main process needs to call it)."""
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on the main process only
        network = get_model_state_dict(policy.model, options=options)
        optimizer_state = get_optimizer_state_dict(policy.model, _unwrapped(optimizer), options=options)
        if not accelerator.is_main_process:
            return None
        names = [name for name, p in policy.model.named_parameters() if p.requires_grad]
        return CheckpointState({name: network[name] for name in names}, network, optimizer_state, "full-by-name")
    if is_deepspeed(accelerator):
        from accelerate.utils import send_to_device

        # ZeRO's optimizer state is partitioned: each process's own part, in process order.
        local = send_to_device(optimizer.state_dict(), "cpu")
        parts = [None] * accelerator.num_processes if accelerator.is_main_process else None
        torch.distributed.gather_object(local, parts, dst=0)
        if not accelerator.is_main_process:
            return None
        return CheckpointState(policy.trainable_state_dict(), None, parts, "deepspeed-zero")
    if not accelerator.is_main_process:
        return None
    return CheckpointState(policy.trainable_state_dict(), None, optimizer.state_dict(), "torch")


def load_checkpoint_state(accelerator: Accelerator, policy, optimizer, trainable: dict[str, torch.Tensor], optimizer_state, layout: str) -> None:
    """Restore a checkpoint's trainable tensors and optimizer state into a prepared run (*collective* under FSDP).

    Raises:
        ConfigError: the checkpoint's optimizer state cannot be resumed under this launch.
    """
    fsdp, deepspeed = is_fsdp(accelerator), is_deepspeed(accelerator)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        missing = [name for name, p in policy.model.named_parameters() if p.requires_grad and name not in trainable]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]!r}")
        set_model_state_dict(policy.model, trainable, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        policy.load_trainable_state_dict(trainable)
    launch = "FSDP" if fsdp else "DeepSpeed" if deepspeed else "data parallel (or one process)"
    if layout == "full-by-name":
        if deepspeed:
            raise ConfigError("this checkpoint was written under FSDP; resume it under FSDP or data parallel, not DeepSpeed")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(policy.model, _unwrapped(optimizer), optimizer_state, options=StateDictOptions(full_state_dict=True))
    elif layout == "deepspeed-zero":
        if not deepspeed or len(optimizer_state) != accelerator.num_processes:
            raise ConfigError(
                f"this checkpoint's optimizer state is DeepSpeed ZeRO's, partitioned over {len(optimizer_state)} processes; "
                f"resume it under DeepSpeed with {len(optimizer_state)} processes (this launch: {launch}, {accelerator.num_processes})"
            )
        # fp32 master weights from the checkpoint's own fp32 copies, not from the (possibly bf16) network.
        _unwrapped(optimizer).load_state_dict(optimizer_state, load_from_fp32_weights=True)
    else:
        if fsdp or deepspeed:
            raise ConfigError(f"this checkpoint was written by a data-parallel (or one-process) run; resume it the same way, not under {launch}")
        optimizer.load_state_dict(optimizer_state)


def _unwrapped(optimizer):
    """The optimizer under accelerate's wrapper (DeepSpeed's ZeRO optimizer under DeepSpeed)."""
    return getattr(optimizer, "optimizer", optimizer)


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on any of them (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return flag
    flags = accelerator.gather(torch.tensor([float(flag)], device=accelerator.device))
    return bool(flags.sum() > 0)


def main_process_decision(accelerator: Accelerator, flag: bool) -> bool:
    """The main process's decision, on every process."""
    if accelerator.num_processes == 1:
        return flag
    return bool(broadcast_object_list([flag], from_process=0)[0])
