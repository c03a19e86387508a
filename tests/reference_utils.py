"""Tiny random ERNIE-4.5 checkpoints built with transformers (the reference), in both on-disk layouts.

    torch_model = make_tiny_checkpoint(path, {"num_key_value_heads": 2}, layout="paddle", seed=0)

writes `path/config.json` + safetensors (single file, or shards + model.safetensors.index.json when
`max_shard_bytes` is given) and returns the transformers model (fp32, eval, eager attention) whose logits
the Paddle model must reproduce. The -Paddle layout is derived from the tensors transformers saves, so any
architecture transformers can save (dense, MoE with per-expert tensors) converts the same way.

Also here: reference logits / greedy decoding on the torch side, and a paged-KV-cache greedy loop on ours.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import torch
from ernie_engine.config import ModelConfig
from ernie_engine.layers.attention import AttentionMetadata, KVCache
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils.logging import disable_progress_bar

TINY_DENSE: dict[str, Any] = {
    "model_type": "ernie4_5",
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "use_bias": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
# -Paddle config.json names the dense architecture with an underscore.
PADDLE_ARCHITECTURES = {"Ernie4_5ForCausalLM": "Ernie4_5_ForCausalLM"}
# transformers tensor -> -Paddle fused tensor, in concatenation order (gate half first in up_gate_proj).
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}
_FUSED |= {"gate_proj": ("up_gate_proj", 0), "up_proj": ("up_gate_proj", 1)}

disable_progress_bar()  # save_pretrained's shard-writing bar would clutter test output


def tiny_config(overrides: dict[str, Any] | None = None):
    """A transformers config: `TINY_DENSE` updated with `overrides` (`model_type` picks the class)."""
    values = {**TINY_DENSE, **(overrides or {})}
    return CONFIG_MAPPING[values.pop("model_type")](**values)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights that exercise every tensor: norms != 1, biases != 0, activations of order 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            elif param.ndim == 2 and name.endswith(".weight"):
                param.copy_(noise * param.shape[1] ** -0.5)  # torch Linear: [out, in]
            else:
                param.copy_(0.1 * noise)


def build_reference(overrides: dict[str, Any] | None = None, seed: int = 0) -> PreTrainedModel:
    config = tiny_config(overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def saved_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors exactly as `save_pretrained` writes them (names after transformers' own conversions)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors: dict[str, torch.Tensor] = {}
        for path in sorted(Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(path))
    return tensors


def to_paddle_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers tensors -> -Paddle tensors: `ernie.` prefix, Linear [in, out], fused qkv / up_gate."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, value in tensors.items():
        new = name if name.startswith("lm_head.") else "ernie." + name.removeprefix("model.")
        if value.ndim == 2 and name.endswith(".weight") and not name.endswith("embed_tokens.weight"):
            value = value.t()  # Linear (and MoE router) weights: [out, in] -> [in, out]
        prefix, module, suffix = _split_module(new)
        if module in _FUSED:
            target, order = _FUSED[module]
            fused.setdefault(f"{prefix}.{target}.{suffix}", []).append((order, value))
        else:
            out[new] = value.contiguous()
    for name, parts in fused.items():
        out[name] = torch.cat([value for _, value in sorted(parts, key=lambda p: p[0])], dim=-1).contiguous()
    return out


def _split_module(name: str) -> tuple[str, str, str]:
    """Prefix, module and suffix of a tensor name: "a.b.q_proj.weight" -> ("a.b", "q_proj", "weight")."""
    head, _, suffix = name.rpartition(".")
    prefix, _, module = head.rpartition(".")
    return prefix, module, suffix


def paddle_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A -Paddle style config.json: architecture spelled the Paddle way, rope_theta at top level."""
    out = dict(config_dict)
    rope = out.pop("rope_parameters", None) or {}
    out["rope_theta"] = rope.get("rope_theta", out.get("rope_theta"))
    out["architectures"] = [PADDLE_ARCHITECTURES.get(a, a) for a in out.get("architectures", [])]
    return out


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None = None
) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index.json when over `max_shard_bytes`."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_checkpoint(
    path: str | Path,
    config_overrides: dict[str, Any] | None = None,
    layout: str = "paddle",
    seed: int = 0,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
) -> PreTrainedModel:
    """Write a random tiny checkpoint to `path` and return its transformers reference model.

    With dtype="bfloat16" the files hold bf16 and the returned fp32 model holds the same bf16-rounded values.
    """
    if layout not in ("paddle", "transformers"):
        raise ValueError(f"layout must be 'paddle' or 'transformers', got {layout!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_reference(config_overrides, seed)
    if dtype == "bfloat16":
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(torch.bfloat16).to(torch.float32))
    tensors = {name: t.to(getattr(torch, dtype)) for name, t in saved_tensors(model).items()}
    config_dict = json.loads(model.config.to_json_string())
    config_dict["dtype"] = dtype
    if layout == "paddle":
        tensors, config_dict = to_paddle_layout(tensors), paddle_config_dict(config_dict)
    write_safetensors(path, tensors, max_shard_bytes)
    (path / "config.json").write_text(json.dumps(config_dict, indent=2))
    return model


def edit_checkpoint(path: str | Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply `edit` in place to the tensors of the single-file checkpoint in `path` (to break it)."""
    file = Path(path) / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


# ---- torch side ---------------------------------------------------------------------------------------


@torch.no_grad()
def torch_logits(model: PreTrainedModel, token_ids: list[int]) -> np.ndarray:
    """Logits [len, vocab] for one unpadded sequence."""
    return model(torch.tensor([token_ids])).logits[0].float().numpy()


@torch.no_grad()
def torch_greedy(model: PreTrainedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation, recomputing the whole sequence each step (no cache, no eos stop)."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(torch_logits(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


# ---- our side -----------------------------------------------------------------------------------------


def flat_positions(query_lens: list[int], context_lens: list[int]) -> paddle.Tensor:
    """Positions of the new tokens of each sequence (the last query_len of its context), flattened."""
    parts = [np.arange(c - q, c) for q, c in zip(query_lens, context_lens, strict=True)]
    return paddle.to_tensor(np.concatenate(parts).astype(np.int64))


def run_flat(model: paddle.nn.Layer, prompts: list[list[int]]) -> list[np.ndarray]:
    """Cache-free forward of a flat batch of whole prompts; logits [len, vocab] per prompt."""
    lens = [len(p) for p in prompts]
    ids = paddle.to_tensor(np.concatenate(prompts).astype(np.int64))
    with paddle.no_grad():
        logits = model.compute_logits(model(ids, flat_positions(lens, lens), AttentionMetadata.build(lens)))
    return np.split(logits.numpy(), np.cumsum(lens)[:-1])


def allocate_kv_caches(config: ModelConfig, num_blocks: int, block_size: int) -> list[KVCache]:
    shape = [num_blocks * block_size, config.num_key_value_heads, config.head_dim]
    return [(paddle.zeros(shape), paddle.zeros(shape)) for _ in range(config.num_hidden_layers)]


def scattered_block_tables(num_seqs: int, blocks_per_seq: int, seed: int = 0) -> list[list[int]]:
    """Non-contiguous, interleaved block ids so the cache path cannot pass by accident."""
    order = np.random.default_rng(seed).permutation(num_seqs * blocks_per_seq)
    return [order[i::num_seqs].tolist() for i in range(num_seqs)]


def paged_greedy(
    model: paddle.nn.Layer,
    config: ModelConfig,
    prompts: list[list[int]],
    max_new_tokens: int,
    block_size: int = 4,
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy decoding of all prompts together through a paged KV cache: one batched prefill, then one flat
    batch of single tokens per step. Returns the new tokens per prompt and the logits
    [max_new_tokens, vocab] that chose them."""
    max_len = max(len(p) for p in prompts) + max_new_tokens
    blocks_per_seq = -(-max_len // block_size)
    tables = scattered_block_tables(len(prompts), blocks_per_seq)
    caches = allocate_kv_caches(config, len(prompts) * blocks_per_seq, block_size)
    context = [len(p) for p in prompts]
    query_lens, step_ids = list(context), np.concatenate(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    logits_seen: list[list[np.ndarray]] = [[] for _ in prompts]
    with paddle.no_grad():
        for _ in range(max_new_tokens):
            meta = AttentionMetadata.build(query_lens, context, tables, block_size)
            ids = paddle.to_tensor(step_ids.astype(np.int64))
            hidden = model(ids, flat_positions(query_lens, context), meta, caches)
            last = paddle.to_tensor(np.cumsum(query_lens) - 1)
            logits = model.compute_logits(paddle.gather(hidden, last)).numpy()
            step_ids = logits.argmax(axis=-1)
            for b, row in enumerate(logits):
                tokens[b].append(int(step_ids[b]))
                logits_seen[b].append(row)
            query_lens = [1] * len(prompts)
            context = [c + 1 for c in context]
    return tokens, [np.stack(rows) for rows in logits_seen]


# ---- multimodal (PaddleOCR-VL, ERNIE-4.5-VL) ------------------------------------------------------------

# The language-model sizes both tiny VL references share (their vocab, depth and rotary differ).
TINY_VL_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
}


def save_multimodal_reference(
    model_class: type[PreTrainedModel],
    config: Any,
    out: Path,
    randomize: Callable[[str, torch.Tensor], None],
) -> PreTrainedModel:
    """A seeded `model_class(config)` whose parameters `randomize(name, param)` edits in place, saved to
    `out` by transformers; returns it (eval mode)."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            randomize(name, param)
    model.save_pretrained(out)
    return model


def multimodal_paged_greedy(
    model: paddle.nn.Layer, config: ModelConfig, prompt: Any, split: int, num_tokens: int = 16
) -> list[int]:
    """Greedy tokens after a `MultimodalPrompt`: its prefill in two chunks split at `split` (embedding rows,
    positions and, for ERNIE-4.5-VL, the MoE vision mask sliced per chunk), then one token per step, all
    through a paged KV cache."""
    block_size, num_blocks = 16, 8
    caches = allocate_kv_caches(config, num_blocks, block_size)
    table = list(range(num_blocks))
    embeds = model.embed_multimodal(prompt.images.pixel_values, prompt.images.grid_thw)
    tokens = list(prompt.prompt_token_ids)
    prompt_len = len(tokens)
    decode = [(n, n + 1) for n in range(prompt_len, prompt_len + num_tokens - 1)]
    chunks = [(0, split), (split, prompt_len), *decode]
    for start, end in chunks:
        ids = paddle.to_tensor(tokens[start:end])
        extra = {"inputs_embeds": model.get_input_embeddings(ids, embeds[prompt.image_rows_for(start, end)])}
        if prompt.vision_token_ids:
            extra["vision_mask"] = paddle.to_tensor(prompt.vision_mask_for(start, end))
        meta = AttentionMetadata.build([end - start], [end], [table], block_size)
        hidden = model(ids, paddle.to_tensor(prompt.positions_for(start, end)), meta, caches, **extra)
        if end >= prompt_len:
            tokens.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
    return tokens[prompt_len:]
