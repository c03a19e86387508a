"""Checkpoint loading: safetensors (single file or sharded) in the -Paddle or the transformers (-PT) layout.

Every model parameter declares where its values come from as a `ParamSpec`: a list of `Piece`s (a
checkpoint tensor, or a range of one, optionally transposed) concatenated along one axis. One function per
layout builds the spec from the parameter name:

- "-Paddle": tensors `ernie.<param>` (`lm_head.weight` at top level), Linear weights [in, out] like ours,
  q/k/v fused in `self_attn.qkv_proj` and gate/up fused in `mlp.up_gate_proj` (gate half first).
- transformers: tensors `model.<param>`, Linear weights [out, in], q/k/v and gate/up separate.

MoE experts are stored one tensor per expert (`mlp.experts.<j>.up_gate_proj.weight` / `gate_proj` + `up_proj`,
`mlp.experts.<j>.down_proj.weight`) but held stacked ([E, ...], layers/moe.py): a stacked parameter is planned
as one spec per expert, each filling `param[j]` exactly as the per-expert Linear weight it is stored as.
Pre-quantized experts (-Paddle layout, docs/QUANTIZATION.md) are planned the same way: int8 `.weight` and
`.weight_scale` per expert into the stacked buffers that layers/quant/apply.py prepared.

Fused parameters are described as their parts in both layouts (three ranges of the -Paddle qkv tensor, three
transformers tensors), so a tensor-parallel `shard` hook can narrow every part to one rank's heads and read
only that slice (`safe_open(...).get_slice`). Nothing is read before the whole plan has been checked against
the checkpoint headers: missing, unexpected and mis-shaped tensors are reported together by name. Two
exceptions follow transformers: a tied config whose checkpoint holds a different LM head is untied
(`model_config`), and a MoE declaring `moe_use_aux_free: false` may omit its router correction biases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paddle
from paddle import nn
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .device import cpu_weight_dtype, device_type, resolve_dtype, set_device
from .layers import cpu_kernels
from .layers.quant.apply import prepare_prequantized, quantize_model, quantized_buffers
from .layers.quant.config import QuantConfig
from .models.registry import get_model_class

logger = logging.getLogger(__name__)

PADDLE = "paddle"
TRANSFORMERS = "transformers"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Multi-token-prediction heads (`ernie.mtp_block.0...`, `ernie.mtp_emb_norm.0...`) are for training /
# speculative decoding; serving does not use them.
_SKIPPED = re.compile(r"^(?:ernie\.|model\.)?mtp_")
# Static activation / C8 cache scales of quantized checkpoints: the model runner reads the cache scales
# (layers/quant/kv_cache.py); activations are quantized per token, so the others go unused.
_QUANT_SCALES = re.compile(r"\.activation_scale$|\.cache_[kv]_scale$")
# Our fused projections and their separate transformers parts, in concatenation order.
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "up_gate_proj": ("gate_proj", "up_proj")}
# 2-D `.weight` parameters that are not Linear weights (so never transposed between layouts).
_NOT_LINEAR = ("embed_tokens.weight",)
# Stacked routed-expert weights ("layers.1.mlp.experts.up_gate_proj", [E, in, out]) and, pre-quantized, their
# scales ("...experts.up_gate_proj_scale", stored per expert as `experts.<j>.up_gate_proj.weight_scale`).
_STACKED_EXPERTS = re.compile(
    r"^(?P<experts>.+\.experts)\.(?P<name>up_gate_proj|down_proj)(?P<scale>_scale)?$"
)
# The aux-free router bias; optional when config.json says `moe_use_aux_free: false`.
_CORRECTION_BIAS = "moe_statics.e_score_correction_bias"
_MAX_LISTED = 20  # problems listed in one error message
_LARGE_NUMEL = 100_000_000  # checkpoints from this many values on log their progress every 10%


@dataclass(frozen=True)
class Piece:
    """A checkpoint tensor, or the range [start, stop) of it along `axis`, that goes into a parameter.

    `shape` is the tensor's expected stored shape. `axis` counts in the parameter's orientation, i.e.
    after the [out, in] -> [in, out] transpose when `transpose` is set.
    """

    tensor: str
    shape: tuple[int, ...]
    transpose: bool = False
    axis: int = 0
    start: int = 0
    stop: int | None = None  # None: to the end of the axis

    def stored_axis(self) -> int:
        return len(self.shape) - 1 - self.axis if self.transpose else self.axis

    def value_shape(self) -> tuple[int, ...]:
        """Shape of the piece as it enters the parameter."""
        shape = list(reversed(self.shape)) if self.transpose else list(self.shape)
        stop = shape[self.axis] if self.stop is None else self.stop
        shape[self.axis] = stop - self.start
        return tuple(shape)


@dataclass(frozen=True)
class ParamSpec:
    """How one parameter is assembled: `pieces` concatenated along `axis`, giving `shape`.

    With `index` set, the spec fills only `param[index]` (one expert of a stacked parameter) and `shape` is
    that slot's shape.
    """

    param: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    axis: int = 0
    index: int | None = None


# (parameter name, full parameter shape, config) -> spec; one per layout.
LayoutFn = Callable[[str, tuple[int, ...], ModelConfig], ParamSpec]
# Narrows a full spec to what this rank holds (tensor parallelism); identity when None.
ShardFn = Callable[[ParamSpec], ParamSpec]


def _fused_sizes(module: str, size: int, config: ModelConfig) -> list[int]:
    """Sizes of the parts of fused projection `module` along its output axis of `size`."""
    if module == "qkv_proj":
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        return [q, kv, kv]
    return [size // 2, size // 2]  # up_gate_proj: gate, up


def _module_name(param: str) -> str:
    """The module holding a parameter: "layers.0.self_attn.qkv_proj.weight" -> "qkv_proj"."""
    parts = param.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def _is_linear_weight(param: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and param.endswith(".weight") and not param.endswith(_NOT_LINEAR)


def _part_ranges(module: str, size: int, config: ModelConfig) -> Iterator[tuple[str, int, int]]:
    start = 0
    for name, part_size in zip(_FUSED_PARTS[module], _fused_sizes(module, size, config), strict=True):
        yield name, start, start + part_size
        start += part_size


def paddle_spec(param: str, shape: tuple[int, ...], config: ModelConfig) -> ParamSpec:
    """-Paddle layout: stored exactly as our parameter; fused ones described as ranges of it."""
    tensor = param if param.startswith("lm_head.") else f"ernie.{param}"
    module, axis = _module_name(param), len(shape) - 1
    if module not in _FUSED_PARTS:
        return ParamSpec(param, shape, (Piece(tensor, shape),))
    pieces = tuple(
        Piece(tensor, shape, axis=axis, start=start, stop=stop)
        for _, start, stop in _part_ranges(module, shape[axis], config)
    )
    return ParamSpec(param, shape, pieces, axis=axis)


def transformers_spec(param: str, shape: tuple[int, ...], config: ModelConfig) -> ParamSpec:
    """transformers layout: Linear weights [out, in]; fused parameters concatenate separate tensors."""
    tensor = param if param.startswith("lm_head.") else f"model.{param}"
    transpose = _is_linear_weight(param, shape)
    module, axis = _module_name(param), len(shape) - 1

    def piece(name: str, size: int) -> Piece:
        part_shape = list(shape)
        part_shape[axis] = size
        stored = tuple(reversed(part_shape)) if transpose else tuple(part_shape)
        return Piece(name, stored, transpose=transpose, axis=axis)

    if module not in _FUSED_PARTS:
        return ParamSpec(param, shape, (piece(tensor, shape[axis]),), axis=axis)
    prefix, suffix = tensor.rsplit(f".{module}.", 1)
    pieces = tuple(
        piece(f"{prefix}.{name}.{suffix}", stop - start)
        for name, start, stop in _part_ranges(module, shape[axis], config)
    )
    return ParamSpec(param, shape, pieces, axis=axis)


LAYOUTS: dict[str, LayoutFn] = {PADDLE: paddle_spec, TRANSFORMERS: transformers_spec}


def plan_parameters(
    shapes: dict[str, tuple[int, ...]], config: ModelConfig, layout: str, shard: ShardFn | None = None
) -> list[ParamSpec]:
    """One spec per parameter. `shapes` are full (unsharded) shapes; `shard` narrows each spec to a rank."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; known: {', '.join(LAYOUTS)}")
    specs = [
        spec for name, shape in shapes.items() for spec in _param_specs(name, tuple(shape), config, layout)
    ]
    return [shard(spec) for spec in specs] if shard else specs


def _param_specs(name: str, shape: tuple[int, ...], config: ModelConfig, layout: str) -> list[ParamSpec]:
    """The spec of a parameter, or of each expert slot of a stacked expert parameter."""
    stacked = _STACKED_EXPERTS.match(name)
    if stacked is None:
        return [LAYOUTS[layout](name, shape, config)]
    experts, weight = stacked["experts"], stacked["name"]
    stored = "weight_scale" if stacked["scale"] else "weight"
    return [
        dataclasses.replace(
            LAYOUTS[layout](f"{experts}.{j}.{weight}.{stored}", shape[1:], config), param=name, index=j
        )
        for j in range(shape[0])
    ]


def detect_layout(tensor_names: Iterable[str]) -> str:
    names = list(tensor_names)
    if any(name.startswith("ernie.") for name in names):
        return PADDLE
    if any(name.startswith("model.") for name in names):
        return TRANSFORMERS
    raise ValueError(
        "cannot tell the checkpoint layout: no tensor name starts with 'ernie.' (-Paddle) or 'model.' "
        f"(transformers); first names: {names[:5]}"
    )


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: from the index if there is one, else the single file."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"unreadable checkpoint index {index}: {err}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in checkpoint folder {model_dir}")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} (named in {INDEX_FILE}) does not exist")
    return files


class Checkpoint:
    """Open safetensors files of one checkpoint; headers are read at open, tensor data only when asked."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.files = checkpoint_files(model_dir)
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}
        self.tensor_file: dict[str, Path] = {}
        try:
            for path in self.files:
                self._open(path)
            self._check_index()
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path) -> None:
        try:
            handle = self._stack.enter_context(safe_open(str(path), framework="paddle", device="cpu"))
        except SafetensorError as err:
            raise ValueError(f"corrupt or unreadable safetensors file {path}: {err}") from None
        self._handles[path] = handle
        for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
            if name in self.tensor_file:
                raise ValueError(f"tensor {name} is stored twice: in {self.tensor_file[name]} and {path}")
            self.tensor_file[name] = path

    def _check_index(self) -> None:
        index = self.model_dir / INDEX_FILE
        if not index.is_file():
            return
        for name, file in json.loads(index.read_text())["weight_map"].items():
            if self.tensor_file.get(name) != self.model_dir / file:
                raise ValueError(f"{index} places tensor {name} in {file}, but that file does not hold it")

    def names(self) -> list[str]:
        return list(self.tensor_file)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.tensor_file[name]].get_slice(name).get_shape())

    def read(self, piece: Piece, dtype: paddle.dtype) -> paddle.Tensor:
        """The piece as an owned CPU tensor of `dtype`, in parameter orientation (only its range is read)."""
        path = self.tensor_file[piece.tensor]
        index = [slice(None)] * len(piece.shape)
        index[piece.stored_axis()] = slice(piece.start, piece.stop)
        try:
            view = self._handles[path].get_slice(piece.tensor)[tuple(index)]
        except SafetensorError as err:
            raise ValueError(
                f"cannot read tensor {piece.tensor} from safetensors file {path}: {err}"
            ) from None
        # Copy out of the memory map at once: two live views of one stored tensor make Paddle abort at
        # teardown (safetensors 0.8 + Paddle 3.3). bf16 -> fp32 happens here, once.
        value = view.astype(dtype) if view.dtype != dtype else view.clone()
        del view
        return paddle.transpose(value, [1, 0]) if piece.transpose else value

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(shape: Iterable[int]) -> str:
    return str(list(shape))


def skipped_tensors(names: Iterable[str], config: ModelConfig) -> list[str]:
    """Checkpoint tensors deliberately not loaded: multi-token prediction, and a redundant tied lm_head."""
    return [
        name
        for name in names
        if _SKIPPED.match(name)
        or _QUANT_SCALES.search(name)
        or (config.tie_word_embeddings and name == "lm_head.weight")
    ]


def _assembled_shape(spec: ParamSpec) -> tuple[int, ...]:
    shapes = [piece.value_shape() for piece in spec.pieces]
    if any(len(shape) != len(spec.shape) for shape in shapes):
        return shapes[0]
    if any(
        shape[: spec.axis] + shape[spec.axis + 1 :] != shapes[0][: spec.axis] + shapes[0][spec.axis + 1 :]
        for shape in shapes
    ):
        return shapes[0]
    total = sum(shape[spec.axis] for shape in shapes)
    return shapes[0][: spec.axis] + (total,) + shapes[0][spec.axis + 1 :]


def check_plan(
    specs: list[ParamSpec], checkpoint: Checkpoint, config: ModelConfig, unused: re.Pattern[str] | None = None
) -> None:
    """Raise one ValueError listing every missing, mis-shaped and unexpected tensor (`unused`: names of
    tensors a checkpoint may hold without a role in inference)."""
    problems: list[str] = []
    used: set[str] = set()
    for spec in specs:
        if _assembled_shape(spec) != spec.shape:  # a layout or shard bug, not a checkpoint problem
            raise ValueError(
                f"pieces of parameter {spec.param} assemble to {_fmt(_assembled_shape(spec))}, "
                f"not {_fmt(spec.shape)}"
            )
        for piece in spec.pieces:
            used.add(piece.tensor)
            if piece.tensor not in checkpoint.tensor_file:
                problems.append(
                    f"missing tensor {piece.tensor} (expected shape {_fmt(piece.shape)}, "
                    f"for parameter {spec.param})"
                )
            elif checkpoint.shape(piece.tensor) != piece.shape:
                problems.append(
                    f"tensor {piece.tensor} has shape {_fmt(checkpoint.shape(piece.tensor))}, expected "
                    f"{_fmt(piece.shape)} (for parameter {spec.param})"
                )
    skipped = set(skipped_tensors(checkpoint.names(), config))
    skipped |= {name for name in checkpoint.names() if unused is not None and unused.search(name)}
    for name in checkpoint.names():
        if name not in used and name not in skipped:
            problems.append(
                f"unexpected tensor {name} (shape {_fmt(checkpoint.shape(name))}) "
                f"in {checkpoint.tensor_file[name].name}"
            )
    if problems:
        listed = "\n  ".join(sorted(set(problems))[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(
            f"checkpoint {checkpoint.model_dir} does not match {config.architecture} "
            f"({len(problems)} problem(s)):\n  {listed}{more}"
        )
    if skipped:
        logger.info(
            "skipping %d checkpoint tensors not used for serving (e.g. %s)", len(skipped), min(skipped)
        )


def load_weights(
    model: nn.Layer,
    model_dir: str | Path,
    config: ModelConfig,
    layout: str | None = None,
    shard: ShardFn | None = None,
    full_shapes: dict[str, tuple[int, ...]] | None = None,
) -> str:
    """Fill every parameter of `model` from the checkpoint in `model_dir`; returns the layout used.

    With tensor parallelism, `full_shapes` gives the unsharded parameter shapes (default: the model's own)
    and `shard` narrows each spec to this rank's slice.
    """
    started = time.monotonic()
    params = {**dict(model.named_parameters()), **quantized_buffers(model)}  # + pre-quantized int weights
    shapes = full_shapes or {name: tuple(p.shape) for name, p in params.items()}
    with Checkpoint(model_dir) as checkpoint:
        layout = layout or detect_layout(checkpoint.names())
        specs = _without_absent_correction_bias(plan_parameters(shapes, config, layout, shard), checkpoint)
        for spec in specs:
            model_shape = tuple(params[spec.param].shape)[0 if spec.index is None else 1 :]
            if model_shape != spec.shape:
                raise ValueError(
                    f"parameter {spec.param}: model shape {_fmt(model_shape)}, plan shape {_fmt(spec.shape)}"
                )
        check_plan(specs, checkpoint, config)
        file_order = {path: i for i, path in enumerate(checkpoint.files)}
        specs.sort(key=lambda s: file_order[checkpoint.tensor_file[s.pieces[0].tensor]])
        fill_parameters(params, specs, checkpoint)
    logger.info(
        "loaded %d parameters (%s layout) from %s in %.1f s",
        len(specs),
        layout,
        model_dir,
        time.monotonic() - started,
    )
    return layout


def _without_absent_correction_bias(specs: list[ParamSpec], checkpoint: Checkpoint) -> list[ParamSpec]:
    """The specs minus the MoE routers' correction biases a checkpoint trained with an auxiliary loss omits.

    Only when config.json says `moe_use_aux_free: false`: such a bias stays zero (transformers fills the
    missing tensor with zeros, vLLM builds no bias), i.e. plain top-k. Every released ERNIE-4.5 MoE ships
    its bias, so without that key a missing one is still an error.
    """
    raw = json.loads((checkpoint.model_dir / "config.json").read_text())
    if raw.get("moe_use_aux_free") is not False:
        return specs

    def absent(spec: ParamSpec) -> bool:
        return spec.param.endswith(_CORRECTION_BIAS) and spec.pieces[0].tensor not in checkpoint.tensor_file

    kept = [spec for spec in specs if not absent(spec)]
    if len(kept) < len(specs):
        logger.info("moe_use_aux_free is false: %d MoE layers route without a correction bias",
                    len(specs) - len(kept))
    return kept


def fill_parameters(params: dict[str, paddle.Tensor], specs: list[ParamSpec], checkpoint: Checkpoint) -> None:
    total = sum(math.prod(spec.shape) for spec in specs) or 1
    done, reported, current_file = 0, 0, None
    progress_level = logging.INFO if total >= _LARGE_NUMEL else logging.DEBUG
    for spec in specs:
        file = checkpoint.tensor_file[spec.pieces[0].tensor]
        if file != current_file:
            current_file = file
            logger.info(
                "reading %s (file %d/%d)", file.name, checkpoint.files.index(file) + 1, len(checkpoint.files)
            )
        param = params[spec.param]
        values = [checkpoint.read(piece, param.dtype) for piece in spec.pieces]
        value = values[0] if len(values) == 1 else paddle.concat(values, axis=spec.axis)
        if spec.index is None:
            param.set_value(value)
        else:
            with paddle.no_grad():
                param[spec.index] = value
        done += math.prod(spec.shape)
        if done * 10 // total > reported:
            reported = done * 10 // total
            logger.log(progress_level, "loaded %d%% of the weights", reported * 10)


@contextlib.contextmanager
def default_dtype(dtype: str) -> Iterator[None]:
    """Create parameters in `dtype` inside the block."""
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(previous)


def build_model(config: ModelConfig, dtype: str) -> nn.Layer:
    """An empty (zero) model of the checkpoint's architecture with parameters in `dtype`."""
    with default_dtype(dtype):
        return get_model_class(config.architecture)(config)


def load_model(
    model_dir: str | Path,
    dtype: str | None = None,
    device: str | None = None,
    layout: str | None = None,
    quantization: QuantConfig | None = None,
) -> tuple[nn.Layer, ModelConfig]:
    """Build the model named by `model_dir/config.json` and fill it from the checkpoint's safetensors.

    `quantization` (see layers/quant): float weights are quantized after loading; a pre-quantized
    checkpoint's int weights are loaded as they are.
    """
    config = model_config(model_dir)
    device = set_device(device)
    requested_dtype, dtype = dtype, resolve_dtype(dtype, device)
    model = build_model(config, dtype)
    quantization = quantization or QuantConfig()
    if quantization.prequantized:
        with Checkpoint(model_dir) as checkpoint:
            prepare_prequantized(model, quantization, lambda name: _paddle_shape(checkpoint, name))
    if hasattr(model, "load_checkpoint"):  # multimodal models map their nested parts themselves
        model.load_checkpoint(model_dir)
    else:
        load_weights(model, model_dir, config, layout)
    quantize_model(model, quantization)
    if device_type(device) == "cpu":  # custom kernels: repack Linears (bf16 weights, int8/int4 layouts)
        bf16 = cpu_weight_dtype(requested_dtype, checkpoint_dtype(model_dir)) == "bfloat16"
        cpu_kernels.prepare_model(model, bf16_weights=bf16)
    model.eval()
    return model, config


def prepare_prequantized_shard(
    model: nn.Layer, model_dir: str | Path, config: ModelConfig, quantization: QuantConfig, shard: ShardFn
) -> dict[str, tuple[int, ...]]:
    """Tensor parallelism: `prepare_prequantized` with each tensor's rank-local shape (the `shard` hook
    applied to its -Paddle spec); returns the unsharded shapes of the buffers made, for `load_weights`."""
    with Checkpoint(model_dir) as checkpoint:

        def local_shape(param: str) -> tuple[int, ...] | None:
            shape = _paddle_shape(checkpoint, param)
            return None if shape is None else shard(paddle_spec(param, shape, config)).shape

        prepare_prequantized(model, quantization, local_shape)
        full: dict[str, tuple[int, ...]] = {}
        for name, buffer in quantized_buffers(model).items():
            stacked = _STACKED_EXPERTS.match(name)
            if stacked is None:
                full[name] = _paddle_shape(checkpoint, name)
                continue
            stored = "weight_scale" if stacked["scale"] else "weight"
            expert0 = _paddle_shape(checkpoint, f"{stacked['experts']}.0.{stacked['name']}.{stored}")
            full[name] = (buffer.shape[0], *expert0)  # every rank holds every expert
    return full


def model_config(model_dir: str | Path) -> ModelConfig:
    """The checkpoint's config.json, untied when the checkpoint contradicts `tie_word_embeddings`.

    transformers' rule: a tied config whose checkpoint holds an `lm_head.weight` different from the embedding
    table is wrong, and the stored LM head is used (an equal copy is just redundant). Tying anyway would
    serve other logits than transformers does from the same files.
    """
    config = ModelConfig.from_dir(model_dir)
    if not config.tie_word_embeddings or hasattr(get_model_class(config.architecture), "load_checkpoint"):
        return config  # multimodal models map their own tensor names
    with Checkpoint(model_dir) as checkpoint:
        embed = next((f"{p}embed_tokens.weight" for p in ("ernie.", "model.")
                      if f"{p}embed_tokens.weight" in checkpoint.tensor_file), None)
        if "lm_head.weight" not in checkpoint.tensor_file or embed is None:
            return config
        if _same_table(checkpoint, embed, "lm_head.weight"):
            return config
    logger.warning(
        "config.json ties the word embeddings, but the checkpoint's lm_head.weight differs from %s: using "
        "the stored LM head, as transformers does (set tie_word_embeddings false)",
        embed,
    )
    return dataclasses.replace(config, tie_word_embeddings=False)


def _same_table(checkpoint: Checkpoint, embed: str, lm_head: str, rows: int = 4096) -> bool:
    """Whether `lm_head` ([vocab, hidden], or [hidden, vocab] as a -Paddle Linear) equals the embedding
    [vocab, hidden]; compared a block of rows at a time, so a differing head costs one block."""
    vocab, hidden = checkpoint.shape(embed)
    transposed = {(hidden, vocab): True, (vocab, hidden): False}.get(checkpoint.shape(lm_head))
    if transposed is None:
        return False
    for start in range(0, vocab, rows):
        stop = min(start + rows, vocab)
        a = checkpoint.read(Piece(embed, (vocab, hidden), start=start, stop=stop), paddle.float32)
        b = checkpoint.read(
            Piece(lm_head, checkpoint.shape(lm_head), transpose=transposed, start=start, stop=stop),
            paddle.float32,
        )
        if not bool(paddle.equal_all(a, b)):
            return False
    return True


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The checkpoint's float dtype: config.json's `torch_dtype` (or transformers 5's `dtype`) when it names
    one, else "bfloat16" when every floating tensor is stored as BF16 (safetensors headers), else float32."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    declared = raw.get("torch_dtype") or raw.get("dtype")
    if isinstance(declared, str) and declared:
        return declared.removeprefix("torch.")
    stored = set()
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="numpy") as handle:
            stored |= {handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
    return "bfloat16" if stored & {"BF16", "F16", "F32", "F64"} == {"BF16"} else "float32"


def _paddle_shape(checkpoint: Checkpoint, param: str) -> tuple[int, ...] | None:
    """Shape of a -Paddle checkpoint tensor by parameter name (pre-quantized checkpoints use that layout)."""
    name = f"ernie.{param}"
    return checkpoint.shape(name) if name in checkpoint.tensor_file else None
