"""Process-group setup and the three engines (DDP, FSDP2, DeepSpeed ZeRO).

Launchers (``torchrun``, ``accelerate launch``, SLURM ``srun`` via torchrun) export ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``; a plain ``llavamed train``
is one process and needs none of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from llavamed.config import DistributedConfig
from llavamed.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(cfg: DistributedConfig) -> DistInfo:
    """Join the process group the launcher described (no-op for a single process)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    info = DistInfo(rank, world, local, device)
    if world > 1 and not dist.is_initialized():
        backend = cfg.backend or ("nccl" if cuda else "gloo")
        dist.init_process_group(backend, timeout=timedelta(minutes=cfg.timeout_minutes))
        info.initialized_here = True
    return info


def shutdown(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item())


def gather_objects(obj, info: DistInfo) -> list:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def wrap_ddp(module, info: DistInfo, find_unused: bool):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.local_rank] if info.device.startswith("cuda") else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused)


def wrap_fsdp2(wrapper, llava) -> object:
    """FSDP2: one shard group per LM decoder layer and per vision encoder layer, the rest (embeddings,
    projector, head) in the root group."""
    from torch.distributed.fsdp import fully_shard

    inner = llava.model
    lm = inner.language_model
    for layer in getattr(lm, "layers", []):
        fully_shard(layer)
    enc = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    for layer in getattr(getattr(enc, "encoder", None), "layers", []) or []:
        fully_shard(layer)
    fully_shard(wrapper)
    return wrapper


def deepspeed_config(
    path: str | None, *, micro_batch: int, accum: int, world: int, lr_holder: dict
) -> dict:
    """The DeepSpeed JSON with batch sizes from our config (``"auto"`` values filled in)."""
    import json

    if path is None:
        raise ConfigError(
            "distributed.deepspeed_config: required with engine=deepspeed (see configs/deepspeed/)"
        )
    try:
        ds = json.loads(open(path, encoding="utf-8").read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"distributed.deepspeed_config: cannot read {path}: {exc}") from exc
    if not isinstance(ds, dict):  # a list or a number was a TypeError traceback per process
        raise ConfigError(
            f"distributed.deepspeed_config: {path} holds a JSON {type(ds).__name__}, not a "
            "DeepSpeed config object (see configs/deepspeed/)"
        )
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro_batch * accum * world
    # Clipping, precision and the optimizer are ours (autocast + torch AdamW), identical across
    # engines so their losses can be compared.
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    ds["gradient_clipping"] = lr_holder.get("max_grad_norm", 0.0)
    for k in ("bf16", "fp16"):
        ds.pop(k, None)
    return ds
