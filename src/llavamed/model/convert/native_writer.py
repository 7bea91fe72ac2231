"""Write a native llava checkpoint straight from tensors, without instantiating the model.

Converters use this so that a 7B conversion needs memory for the source weights only. Tensors
come keyed by transformers' in-memory names and are written under the llava-hf on-disk names
(``language_model.model.*``, ``language_model.lm_head.*``, ``multi_modal_projector.*``,
``vision_tower.vision_model.*``; ``checkpoint_format.disk_key``) that transformers 4.x/5.x, vLLM
and SGLang all read.
"""

from __future__ import annotations

import json
from pathlib import Path

from llavamed.model.checkpoint_format import (
    add_legacy_rope_theta,
    disk_key,
    is_untrained_checkpoint,
    legacy_tokenizer_config,
    write_meta,
)

SHARD_BYTES = 4 * 1024**3


def write_native_checkpoint(
    dst, config, tensors: dict, processor, generation: dict, meta: dict, *, src
) -> Path:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from llavamed.utils.io import atomic_dir

    dst = Path(dst)
    with atomic_dir(dst, ours=is_untrained_checkpoint, keep=(src,)) as tmp:
        vtype = config.vision_config.model_type
        named = {disk_key(k, vtype): v.contiguous() for k, v in tensors.items()}
        shards, cur, size = [], {}, 0
        for k in sorted(named):
            nbytes = named[k].numel() * named[k].element_size()
            if cur and size + nbytes > SHARD_BYTES:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = named[k]
            size += nbytes
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            from tqdm import tqdm

            weight_map = {}
            bar = tqdm(shards, desc=f"writing {dst.name}", unit="shard", leave=False)
            for i, shard in enumerate(bar, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in named.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        config.architectures = ["LlavaForConditionalGeneration"]
        config.save_pretrained(tmp)
        add_legacy_rope_theta(tmp)
        GenerationConfig(**{k: v for k, v in generation.items() if v is not None}).save_pretrained(
            tmp
        )
        processor.save_pretrained(tmp)
        legacy_tokenizer_config(tmp)
        write_meta(tmp, {"spec": None, **meta})
    return dst
