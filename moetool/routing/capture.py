"""Record, per MoE layer and per token, the chosen experts, their weights and the token's
modality, for any number of experts, top-k, MoE layer layout and image-token count."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch


@dataclass
class RoutingCapture:
    """Long-format routing records: one row per (sample, token, MoE layer, rank)."""

    records: pd.DataFrame  # sample, position, layer, modality, rank, expert, weight
    num_experts: int
    top_k: int
    layers: list[int]  # real decoder-layer indices of the MoE layers

    def save(self, out: str | Path) -> None:
        """``out/routing.parquet`` and ``out/routing.json`` (experts, top-k, layers)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.records.to_parquet(out / "routing.parquet", index=False)
        (out / "routing.json").write_text(
            json.dumps(
                {"num_experts": self.num_experts, "top_k": self.top_k, "layers": self.layers},
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def load(cls, path: str | Path) -> RoutingCapture:
        path = Path(path)
        meta = json.loads((path / "routing.json").read_text())
        return cls(pd.read_parquet(path / "routing.parquet"), **meta)


def capture_routing(model, batches) -> RoutingCapture:
    """Run ``model`` (a sparse moetool LVLM) over ``batches`` (dicts of model inputs with
    ``input_ids`` and ``attention_mask``) and collect the routing of every non-padding token:
    the routing each MoE block takes from the router logits the model returns."""
    if not hasattr(model, "moe_blocks") or not model.moe_blocks():
        raise ValueError("the model has no MoE layers: routing needs a sparse checkpoint")
    layers = model.moe_layer_indices()
    blocks = model.moe_blocks()
    image_token = model.config.image_token_id
    frames = []
    offset = 0
    model.eval()
    for batch in batches:
        with torch.no_grad():
            out = model(**batch, router_losses=False, output_router_logits=True)
        ids = batch["input_ids"]
        batch_size, length = ids.shape
        sample = torch.arange(batch_size).repeat_interleave(length) + offset
        position = torch.arange(length).repeat(batch_size)
        mask = batch.get("attention_mask")
        valid = (
            torch.ones(len(sample), dtype=torch.bool)
            if mask is None
            else mask.reshape(-1).bool().cpu()
        )
        image = (ids == image_token).reshape(-1).cpu()
        for layer, block, logits in zip(layers, blocks, out.router_logits, strict=True):
            routing = block.routing(logits)
            k = routing.expert_index.shape[1]
            frames.append(
                pd.DataFrame(
                    {
                        "sample": sample[valid].repeat_interleave(k).numpy(),
                        "position": position[valid].repeat_interleave(k).numpy(),
                        "layer": layer,
                        "modality": pd.Categorical(
                            ["image" if m else "text" for m in image[valid].repeat_interleave(k)],
                            categories=["text", "image"],
                        ),
                        "rank": torch.arange(k).repeat(int(valid.sum())).numpy(),
                        "expert": routing.expert_index.cpu()[valid].reshape(-1).numpy(),
                        "weight": routing.combine_weight.cpu()[valid].reshape(-1).float().numpy(),
                    }
                )
            )
        offset += batch_size
    config = model.moe_config
    return RoutingCapture(
        pd.concat(frames, ignore_index=True), config.num_experts, config.top_k, layers
    )


def capture_from_llava_json(
    checkpoint: str | Path,
    data: list[str | Path],
    image_folder: str | Path,
    limit: int | None = None,
    batch_size: int = 4,
    template: str | None = None,
    max_length: int = 2048,
    attn_implementation: str | None = None,
) -> RoutingCapture:
    """Capture routing of a sparse checkpoint over LLaVA-JSON samples, rendered with the
    checkpoint's conversation template (from its recipe snapshot, or ``template``); a whole
    VLM's (a base other than LLaVA) with its own processor and chat template, as training
    encodes them."""
    from moetool.data.chat import ChatPreprocessor, collate_features
    from moetool.data.llava_json import load_llava_json
    from moetool.data.preprocess import Preprocessor, collate
    from moetool.data.templates import get_template
    from moetool.models.bases import is_llava_layout
    from moetool.models.inference import load_checkpoint

    # collate pads itself, on the right
    model, processor = load_checkpoint(checkpoint, attn_implementation=attn_implementation)
    if not is_llava_layout(model.config.model_type):
        pre, pad = ChatPreprocessor(processor, max_length), collate_features
    else:
        recipe = (getattr(model.config, "moetool", None) or {}).get("recipe") or {}
        name = template or (recipe.get("data") or {}).get("template")
        if not name:
            raise ValueError(
                f"{checkpoint}: no recipe snapshot names its conversation template; pass --template"
            )
        image_seq_length = model.config.image_seq_length
        pre, pad = (
            Preprocessor(processor, get_template(name), image_seq_length, max_length),
            collate,
        )
    samples, _ = load_llava_json(list(data), image_folder)
    samples = samples[:limit] if limit else samples
    encoded = [pre.encode(s) for s in samples]
    batches = []
    for i in range(0, len(encoded), batch_size):
        batch = pad(encoded[i : i + batch_size], processor.tokenizer.pad_token_id)
        batch.pop("labels")
        batches.append(batch)
    return capture_routing(model, batches)


def capture_from_eval_data(
    checkpoint: str | Path,
    task: str,
    data: str | Path,
    limit: int | None = None,
    batch_size: int = 4,
    attn_implementation: str | None = None,
) -> RoutingCapture:
    """Capture routing over an evaluation task's local data: ``data`` is the directory of
    ``datasets.save_to_disk`` folders that ``moetool eval --data`` reads, ``task`` an lmms-eval
    task it holds (e.g. ``pope_random``, ``gqa``, ``mmbench_en_dev``). Each question is asked
    as the evaluation asks it: the checkpoint's chat template, its image preprocessing."""
    from datasets import load_from_disk

    from moetool.eval.tasks import get_lmms_task
    from moetool.models.inference import build_prompt, load_checkpoint

    try:
        spec = get_lmms_task(task)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    split = spec.split
    path = Path(data) / spec.data_folder
    if not path.is_dir():
        raise ValueError(f"{path}: no such dataset directory (write it with `moetool data synth`)")
    rows = load_from_disk(str(path))[split]
    if limit:
        rows = rows.select(range(min(limit, len(rows))))
    # its processor pads/resizes as trained
    model, processor = load_checkpoint(checkpoint, attn_implementation=attn_implementation)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        questions = []
        for i, question in enumerate(chunk["question"]):
            options = [f"{o}. {chunk[o][i]}" for o in "ABCD" if o in chunk and chunk[o][i]]
            questions.append("\n".join([question, *options]))
        images = [image.convert("RGB") for image in chunk["image"]]
        prompts = [build_prompt(processor, q, 1, model.config.model_type) for q in questions]
        batches.append(
            dict(processor(images=images, text=prompts, padding=True, return_tensors="pt"))
        )
    return capture_routing(model, batches)


def capture_to_dir(
    model: str | Path,
    data: list[str | Path],
    out: str | Path,
    task: str | None = None,
    image_folder: str | Path = ".",
    limit: int | None = None,
    batch_size: int = 4,
    template: str | None = None,
    overwrite: bool = False,
    attn_implementation: str | None = None,
) -> RoutingCapture:
    """``moetool routing capture``: capture over LLaVA-JSON ``data`` (or, with ``task``, the one
    evaluation data directory in ``data``) and save it into ``out`` atomically. ``out`` and the
    attention implementation (``attn_implementation``, else the checkpoint's) are checked
    before the model runs; ``out`` may not hold any input."""
    from moetool.io import atomic_output_dir, check_overwrite
    from moetool.models.inference import checkpoint_attention

    if task is not None and len(data) != 1:
        raise ValueError("--task reads one --data directory (the one `moetool eval --data` reads)")
    inputs = [model, *data, image_folder if task is None else None]
    check_overwrite(out, inputs)
    attention = checkpoint_attention(model, attn_implementation)  # capture runs fp32 on the CPU
    if task is not None:
        result = capture_from_eval_data(model, task, data[0], limit, batch_size, attention)
    else:
        result = capture_from_llava_json(
            model, data, image_folder, limit, batch_size, template, attn_implementation=attention
        )
    with atomic_output_dir(out, overwrite, inputs=inputs) as tmp:
        result.save(tmp)
    return result
