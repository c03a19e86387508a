"""CPU custom operators (ernie_engine/csrc/): bf16 / int8 / int4 linear, paged attention, RMSNorm, rotary and
SwiGLU, where Paddle has none (or only chains of small or single-threaded ops); and fused forms that save a
decode step the dispatch of small ops around them (residual add + RMSNorm; rotary + KV-cache write).

The sources ship inside the package, so a backend installed elsewhere (scripts/install_backend.sh) builds its
own. The extension is compiled once per copy of the package into `.runtime/cpu_kernels/` in the package's
parent folder (backend/ in a checkout, <backends>/ernie when installed; ERNIE_CPU_KERNELS_DIR overrides);
scripts/setup.sh and install_backend.sh build it ahead of time, otherwise the first `available()` call does.
It is loaded once per process. When it cannot be built, the CPU lacks AVX512, or `ERNIE_CPU_KERNELS=0`,
`available()` is False and every layer keeps its Paddle path (the one XPU uses with paddlepaddle-xpu's
kernels).

Weight layout the kernels read (made once at load by `prepare_model`): the packed k-pair layout of
csrc/linear.cc, [out/16, in/2, 16 x pair] - bf16, int8, or int4 bytes in layers/quant's nibble order - with
int scales [G, out] (padded to whole blocks); stacked MoE experts the same per expert. `Linear.cpu_kernel` and
`GroupedExperts.cpu_kernel` name the format ("" = Paddle path), `kernel_dims` the unpacked (out, in) of each
repacked weight. Values are those of the checkpoint or of layers/quant: only the order changes.

Numerics: activations are rounded to bf16 (nearest, ties to even) before every matmul, then multiplied with
the exact weight values (int8 / int4 values are exact in bf16) and summed in fp32, each group's sum times its
scale: what a bf16 model computes on XPU/GPU and in vLLM-CPU. Every batch size, prefill included, runs the
same per-output summation, so a sequence's results do not depend on its batch.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import paddle

if TYPE_CHECKING:
    from paddle import nn

    from .attention import AttentionMetadata

logger = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]  # ernie_engine/
CSRC = PACKAGE / "csrc"
BUILD_DIR = Path(os.environ.get("ERNIE_CPU_KERNELS_DIR", PACKAGE.parent / ".runtime" / "cpu_kernels"))
NAME = "ernie_cpu_kernels"
SOURCES = ("linear.cc", "elementwise.cc", "paged_attention.cc", "bandwidth.cc")
HEADERS = ("cpu_kernels.h", "thread_pool.h")
# Baseline ISA for the library; AVX512 functions carry their own target attributes (csrc/cpu_kernels.h).
CFLAGS = ["-O3", "-std=c++17", "-Wall"]
LDFLAGS = ["-pthread"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
QUANT_FORMATS = {"wint8": 8, "wint4": 4, "w4a8": 4}
LANES = 16  # outputs per column block of the packed layout
FP32 = paddle.float32
BF16 = paddle.bfloat16
# A Paddle build without accelerators holds every tensor on the CPU: `on_cpu` then skips the place lookup
# (~0.6 us, several times per layer and step).
_CPU_ONLY = not (
    paddle.is_compiled_with_cuda()
    or paddle.is_compiled_with_xpu()
    or paddle.device.get_all_custom_device_type()
)

_module: ModuleType | None = None
_loaded = False  # tried (successfully or not) in this process
_disabled = False  # set_enabled(False)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _source_hash() -> str:
    digest = hashlib.sha256(" ".join(CFLAGS + LDFLAGS).encode())
    for name in HEADERS + SOURCES:
        digest.update((CSRC / name).read_bytes())
    return digest.hexdigest()[:16]


def build() -> ModuleType:
    """Compile (if the sources changed since the last build) and import the extension; raises on failure."""
    from paddle.utils import cpp_extension
    from paddle.utils.cpp_extension import extension_utils

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    stamp = BUILD_DIR / "sources.sha256"
    wanted = _source_hash()
    # Several processes of one checkout (tests, Triton stubs) may start at once: one compiles, the rest wait.
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        library = BUILD_DIR / NAME / f"{NAME}.so"
        if stamp.is_file() and stamp.read_text() == wanted and library.is_file():
            # Up to date: import the library directly (load() would spend seconds re-running its setup.py).
            module = extension_utils._import_module_from_library(NAME, str(library.parent), False)
        else:
            logger.info(
                "cpu kernels: compiling %s into %s (about a minute on 2 cores)", ", ".join(SOURCES), BUILD_DIR
            )
            # From scratch: Paddle's build compares only the .cc files' times with the library's, so after a
            # header-only change it would keep the old library.
            shutil.rmtree(BUILD_DIR / NAME, ignore_errors=True)
            module = cpp_extension.load(
                name=NAME,
                sources=[str(CSRC / name) for name in SOURCES],
                extra_cxx_cflags=CFLAGS,
                extra_ldflags=LDFLAGS,
                build_directory=str(BUILD_DIR),
                verbose=False,
            )
            stamp.write_text(wanted)
    logger.info("cpu kernels: loaded %s from %s in %.1f s", NAME, BUILD_DIR, time.monotonic() - started)
    return module


def available() -> bool:
    """True when the custom ops can run here (built, loaded, AVX512 present, not disabled)."""
    global _module, _loaded
    if not _loaded:
        _loaded = True
        if os.environ.get("ERNIE_CPU_KERNELS", "1").lower() in ("0", "off", "false", "no"):
            logger.info("cpu kernels: disabled by ERNIE_CPU_KERNELS; using the Paddle path")
        elif platform.machine() not in ("x86_64", "AMD64") or not set(REQUIRED_CPU_FLAGS) <= _cpu_flags():
            logger.warning(
                "cpu kernels: CPU lacks %s; using the (slower) Paddle path", "/".join(REQUIRED_CPU_FLAGS)
            )
        else:
            try:
                _module = build()
            except Exception as err:  # a compiler problem must not stop the engine: fall back, loudly
                logger.warning("cpu kernels: build failed (%s); using the (slower) Paddle path", err)
    return _module is not None and not _disabled


def set_enabled(enabled: bool) -> None:
    """Turn the kernels off (or back on) in this process; layers already repacked keep using them."""
    global _disabled
    _disabled = not enabled


def ops() -> ModuleType:
    if not available():
        raise RuntimeError("cpu kernels are not available (see the log for why)")
    assert _module is not None
    return _module


def on_cpu(x: paddle.Tensor) -> bool:
    return _CPU_ONLY or x.place.is_cpu_place()


# ---- linear ----


def _bits(fmt: str) -> int:
    return 16 if fmt == "bf16" else QUANT_FORMATS[fmt]


def pack_weight(weight: paddle.Tensor, bits: int) -> paddle.Tensor:
    """[..., N, U] -> [..., ceil(N/16), pairs, 16 x pair] (csrc/linear.cc): column blocks of 16 outputs, each
    holding its outputs' input pairs side by side. U = K values (bits 16: bf16, 8: int8) or K/2 int4 bytes
    (bits 4: a byte is a pair); N padded to whole blocks and an odd K to an even one, with zeros."""
    pair = 1 if bits == 4 else 2
    *lead, n, u = weight.shape
    if u % pair:
        weight = paddle.concat([weight, paddle.zeros([*lead, n, 1], dtype=weight.dtype)], axis=-1)
        u += 1
    blocks, pairs = -(-n // LANES), u // pair
    if n % LANES:
        pad = paddle.zeros([*lead, blocks * LANES - n, u], dtype=weight.dtype)
        weight = paddle.concat([weight, pad], axis=-2)
    d = len(lead)
    order = [*range(d), d, d + 2, d + 1, d + 3]  # [.., block, lane, pair, .] <-> [.., block, pair, lane, .]
    packed = weight.reshape([*lead, blocks, LANES, pairs, pair]).transpose(order)
    return packed.reshape([*lead, blocks, pairs, LANES * pair]).contiguous()


def unpack_weight(packed: paddle.Tensor, n: int, u: int, bits: int) -> paddle.Tensor:
    """The inverse of `pack_weight`: [..., N, U]."""
    pair = 1 if bits == 4 else 2
    *lead, blocks, pairs, _ = packed.shape
    d = len(lead)
    order = [*range(d), d, d + 2, d + 1, d + 3]
    weight = packed.reshape([*lead, blocks, pairs, LANES, pair]).transpose(order)
    return weight.reshape([*lead, blocks * LANES, pairs * pair])[..., :n, :u].contiguous()


def pad_scale(scale: paddle.Tensor) -> paddle.Tensor:
    """int weights' scales [..., G, N] fp32 -> [..., G, N padded to whole blocks]."""
    *lead, groups, n = scale.shape
    if n % LANES:
        pad = paddle.zeros([*lead, groups, LANES - n % LANES], dtype=scale.dtype)
        scale = paddle.concat([scale, pad], axis=-1)
    return scale.contiguous()


def linear_packed(
    x: paddle.Tensor,
    weight: paddle.Tensor,
    n: int,
    bits: int,
    scale: paddle.Tensor | None = None,
    bias: paddle.Tensor | None = None,
) -> paddle.Tensor:
    """x [..., K] fp32 @ W^T + bias for W [n, K] held by `pack_weight` (int: with scales from `pad_scale`)
    -> [..., n] fp32."""
    if x.ndim == 2:  # the layers' usual [T, K]: no reshapes to dispatch
        return ops().ernie_linear(x, weight, scale, bias, n, bits)
    out = ops().ernie_linear(x.reshape([-1, x.shape[-1]]), weight, scale, bias, n, bits)
    return out.reshape(x.shape[:-1] + [n])


def matmul(
    x: paddle.Tensor,
    fmt: str,
    weight: paddle.Tensor,
    n: int,
    scale: paddle.Tensor | None = None,
    bias: paddle.Tensor | None = None,
    input_sharded: bool = False,
) -> paddle.Tensor:
    """x [..., K] @ W^T + bias for a packed weight of format `fmt` ("bf16" or a quant method, then with its
    scale) holding W [n, K] -> [..., n] fp32. W4A8 first quantizes x to int8 values per token."""
    if x.dtype is not FP32:
        x = x.astype("float32")
    if fmt != "w4a8":
        return linear_packed(x, weight, n, _bits(fmt), scale, bias)
    # int8 activations (per token) times int4 weights: integer-exact sums, then both scales
    from .quant.weights import quantize_activation

    flat = x.reshape([-1, x.shape[-1]])
    xq, x_scale = quantize_activation(flat, input_sharded)
    out = (linear_packed(xq, weight, n, 4, scale) * x_scale).reshape(x.shape[:-1] + [n])
    return out if bias is None else out + bias


def linear(layer: nn.Layer, x: paddle.Tensor) -> paddle.Tensor:
    """Linear.forward for a layer that `prepare_linear` converted (`layer.cpu_kernel` names the format)."""
    scale = layer.weight_scale if layer.quant_method else None
    n = layer.kernel_dims["weight"][0]
    return matmul(x, layer.cpu_kernel, layer.weight, n, scale, layer.bias, layer.input_sharded)


def _replace(layer: nn.Layer, name: str, value: paddle.Tensor, persistable: bool = True) -> None:
    """Swap a parameter or buffer for `value` (a buffer), releasing the old tensor."""
    if name in layer._parameters:
        delattr(layer, name)
    layer.register_buffer(name, value, persistable=persistable)


def _swap_last(t: paddle.Tensor) -> paddle.Tensor:
    """[..., a, b] -> [..., b, a] (contiguous): between the -Paddle [in, out] and the kernels' [out, in]."""
    return t.transpose([*range(t.ndim - 2), t.ndim - 1, t.ndim - 2]).contiguous()


def _kernel_weights(layer: nn.Layer) -> tuple[str, ...]:
    """Names of the weights the kernels multiply: a Linear's `weight`, or stacked experts' two."""
    from .moe import GroupedExperts
    from .quant.apply import EXPERT_WEIGHTS

    return EXPERT_WEIGHTS if isinstance(layer, GroupedExperts) else ("weight",)


def _checkpoint_layout(prepared: dict[str, nn.Layer], state: dict[str, paddle.Tensor]) -> None:
    """state_dict hook: repacked weights go out as loaded ([..., in, out], fp32 or layers/quant's int
    layout)."""
    for name, layer in prepared.items():
        bits = _bits(layer.cpu_kernel)
        for weight in _kernel_weights(layer):
            key = f"{name}.{weight}"
            if key not in state:
                continue
            n, k = layer.kernel_dims[weight]
            unpacked = unpack_weight(getattr(layer, weight), n, k // 2 if bits == 4 else k, bits)
            if bits == 16:
                state[key] = _swap_last(unpacked.astype("float32"))
            else:
                state[key] = _swap_last(unpacked)
                state[f"{key}_scale"] = getattr(layer, f"{weight}_scale")[..., :n].contiguous()


def _quant_supported(layer: nn.Layer) -> bool:
    """G's CPU layout (not XPU's), with groups of whole input pairs, for every weight of the layer."""
    if getattr(layer, "quant_device_layout", False):
        return False
    bits = QUANT_FORMATS[layer.quant_method]
    for weight in _kernel_weights(layer):
        qweight, scale = getattr(layer, weight), getattr(layer, f"{weight}_scale")
        in_features, groups = qweight.shape[-2] * (2 if bits == 4 else 1), scale.shape[-2]
        if qweight.ndim != scale.ndim or (groups > 1 and (in_features // 2) % groups):
            return False
    return True


def prepare_linear(layer: nn.Layer, bf16_weights: bool) -> bool:
    """Pack one Linear, or one layer's stacked experts, for the kernels; returns whether it now runs on them.
    Weights [..., in (or in/2 int4 bytes), out] become `pack_weight`'s layout, scales [..., G, out] are padded
    to whole blocks."""
    method = layer.quant_method
    if method and (method not in QUANT_FORMATS or not _quant_supported(layer)):
        return False
    if not method and not bf16_weights:
        return False
    bits = QUANT_FORMATS[method] if method else 16
    layer.kernel_dims = {}
    for weight in _kernel_weights(layer):
        value = getattr(layer, weight)
        n, rows = value.shape[-1], value.shape[-2]
        layer.kernel_dims[weight] = (n, rows * 2 if bits == 4 else rows)
        if bits == 16:
            value = value.astype("bfloat16")
        _replace(layer, weight, pack_weight(_swap_last(value), bits))
        if method:
            _replace(layer, f"{weight}_scale", pad_scale(getattr(layer, f"{weight}_scale").astype("float32")))
    if not method and getattr(layer, "bias", None) is not None:
        layer.bias = layer.bias.astype("float32")
    layer.cpu_kernel = method or "bf16"
    return True


def prepare_model(model: nn.Layer, bf16_weights: bool) -> None:
    """After loading (and quantizing) on CPU: repack every Linear and stacked-experts layer the kernels can
    run, in place.

    With `bf16_weights`, float Linears and experts keep bf16 weights resident, and a tied LM head gets its
    own bf16 copy of the embedding table (the fp32 table stays for lookups; the head is what each step
    streams).
    """
    if not available():
        return
    from .linear import Linear
    from .moe import GroupedExperts

    started, prepared = time.monotonic(), {}
    for name, layer in model.named_sublayers():
        if (
            isinstance(layer, (Linear, GroupedExperts))
            and not layer.cpu_kernel
            and prepare_linear(layer, bf16_weights)
        ):
            prepared[name] = layer
    model.register_state_dict_hook(functools.partial(_checkpoint_layout, prepared))
    count = len(prepared)
    embed = getattr(model, "embed_tokens", None)
    if bf16_weights and getattr(model, "lm_head", 0) is None and embed is not None:
        vocab, hidden = embed.weight.shape
        # A tiny placeholder weight, replaced by the table ([vocab, hidden] is the kernel layout); tied,
        # so the copy is no checkpoint key (not persistable).
        head = Linear(hidden, 1)
        head.out_features = vocab
        _replace(head, "weight", pack_weight(embed.weight.astype("bfloat16"), 16), persistable=False)
        head.kernel_dims = {"weight": (vocab, hidden)}
        head.cpu_kernel = "bf16"
        model.lm_head = head
        count += 1
    logger.info(
        "cpu kernels: %d linear / expert layers repacked (float weights as %s) in %.1f s",
        count,
        "bf16" if bf16_weights else "fp32 via Paddle",
        time.monotonic() - started,
    )


# ---- element-wise ----


def fp32_supported(*tensors: paddle.Tensor) -> bool:
    """Whether the fp32 ops (attention, element-wise) take these inputs: CPU fp32 tensors and the kernels
    available (dtype and device first: on XPU this never triggers a build). Called several times per layer,
    so it compares dtypes by identity (Paddle's dtypes are singletons; `==` costs ~0.7 us)."""
    for t in tensors:
        if t.dtype is not FP32:
            return False
    return on_cpu(tensors[0]) and available()


def caches_supported(key_cache: paddle.Tensor, value_cache: paddle.Tensor) -> bool:
    """Whether the attention ops take these KV caches: CPU tensors, both fp32 or both bf16 (kernels built)."""
    dtype = key_cache.dtype
    same = value_cache.dtype is dtype
    return (dtype is FP32 or dtype is BF16) and same and on_cpu(key_cache) and available()


def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """weight * x / sqrt(mean(x^2, last axis) + eps), fp32."""
    return ops().ernie_rms_norm(x.contiguous(), weight, eps)


def add_rms_norm(
    x: paddle.Tensor, residual: paddle.Tensor, weight: paddle.Tensor, eps: float
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """(rms_norm(x + residual), x + residual), fp32: a residual add and the norm after it in one op."""
    normed, total = ops().ernie_add_rms_norm(x.contiguous(), residual.contiguous(), weight, eps)
    return normed, total


def rotary(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """x [T, heads, D] with its (x[2i], x[2i + 1]) pairs rotated by cos / sin [T, ..., D/2], fp32."""
    return ops().ernie_rotary(x.contiguous(), cos, sin)


def rotary_kv_write(
    qkv: paddle.Tensor,
    cos: paddle.Tensor,
    sin: paddle.Tensor,
    key_cache: paddle.Tensor,
    value_cache: paddle.Tensor,
    slot_mapping: paddle.Tensor,
) -> paddle.Tensor:
    """The fused q/k/v projection's output [T, (H + 2 KVH) * D] -> q [T, H, D] rotated as by `rotary`; k
    (rotated) and v stored into the [S, KVH, D] caches (fp32 or bf16) at `slot_mapping` in place."""
    return ops().ernie_rotary_kv_write(qkv.contiguous(), cos, sin, key_cache, value_cache, slot_mapping)[0]


def swiglu(x: paddle.Tensor) -> paddle.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x [..., 2I], fp32."""
    if x.ndim == 2:
        return ops().ernie_swiglu(x)
    flat = x.reshape([-1, x.shape[-1]])
    return ops().ernie_swiglu(flat).reshape([*x.shape[:-1], x.shape[-1] // 2])


# ---- attention ----


def paged_attention(
    q: paddle.Tensor,
    key_cache: paddle.Tensor,
    value_cache: paddle.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> paddle.Tensor:
    """q [T, H, D] against the keys/values at `meta.kv_index` of [S, KVH, D] caches (fp32 or bf16)
    -> [T, H, D]."""
    return ops().ernie_paged_attention(q, key_cache, value_cache, meta.kv_index, meta.lens, scale)


def read_sum(buffer: paddle.Tensor) -> paddle.Tensor:
    """Sum of an int64 buffer over all threads: the memory-bandwidth probe of scripts/bench_kernels.py."""
    return ops().ernie_read_sum(buffer)
