"""CPU custom operators (ernie_engine/csrc/): bf16 / int8 / int4 linear and paged attention, where Paddle has
none.

The sources ship inside the package, so a backend installed elsewhere (scripts/install_backend.sh) builds its
own. The extension is compiled once per copy of the package into `.runtime/cpu_kernels/` in the package's
parent folder (backend/ in a checkout, <backends>/ernie when installed; ERNIE_CPU_KERNELS_DIR overrides);
scripts/setup.sh and install_backend.sh build it ahead of time, otherwise the first `available()` call does.
It is loaded once per process. When it cannot be built, the CPU lacks AVX512, or `ERNIE_CPU_KERNELS=0`,
`available()` is False and every layer keeps its Paddle path (the one XPU uses with paddlepaddle-xpu's
kernels). Prefill-sized batches multiply a dequantized fp32 copy with Paddle's sgemm (`DENSE_MIN_ROWS`).

Weight layout the kernels read (made once at load by `prepare_model`, see csrc/linear.cc): output-major
rows, i.e. the -Paddle [in, out] weight transposed to [out, in]; bf16 as is, int8 [out, in], int4 [out, in/2]
with layers/quant's nibble order (input row 2j low, 2j + 1 high) and scales [out, G]. `Linear.cpu_kernel`
names the format ("" = Paddle path). The transposition is the only repacking: values are those of
layers/quant, so numerics match its dequantize-then-matmul reference up to fp32 summation order.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
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
SOURCES = ("linear.cc", "paged_attention.cc", "bandwidth.cc")
HEADERS = ("cpu_kernels.h", "thread_pool.h")
# Baseline ISA for the library; AVX512 functions carry their own target attributes (csrc/cpu_kernels.h).
CFLAGS = ["-O3", "-std=c++17", "-Wall"]
LDFLAGS = ["-pthread"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
QUANT_FORMATS = {"wint8": 8, "wint4": 4, "w4a8": 4}
# From this many rows (prefill chunks) a Linear runs as Paddle's sgemm on a dequantized fp32 copy of its
# weight: the streaming kernels are built for decode and reach ~1/3 of sgemm's rate at M = 512.
DENSE_MIN_ROWS = 128

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
    return x.place.is_cpu_place()


# ---- linear ----


def linear_bf16(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor | None = None) -> paddle.Tensor:
    """x [..., K] fp32 @ weight[N, K]^T (bf16) + bias -> [..., N] fp32."""
    flat = x.reshape([-1, x.shape[-1]])
    out = ops().ernie_linear_bf16(flat, weight, bias)
    return out.reshape(x.shape[:-1] + [weight.shape[0]])


def linear_int(
    x: paddle.Tensor,
    weight: paddle.Tensor,
    scale: paddle.Tensor,
    bits: int,
    bias: paddle.Tensor | None = None,
) -> paddle.Tensor:
    """x [..., K] fp32 @ dequant(weight [N, K or K/2] int8, scale [N, G])^T + bias -> [..., N] fp32."""
    flat = x.reshape([-1, x.shape[-1]])
    out = ops().ernie_linear_int(flat, weight, scale, bias, bits)
    return out.reshape(x.shape[:-1] + [weight.shape[0]])


def dequantize(weight: paddle.Tensor, scale: paddle.Tensor | None, bits: int) -> paddle.Tensor:
    """fp32 [N, K] copy of a kernel-layout weight (bits 16: bf16, no scale; 8 / 4: int8 with its scale)."""
    return ops().ernie_dequantize(weight, scale, bits)


def linear_dense(layer: nn.Layer, x: paddle.Tensor) -> paddle.Tensor:
    """The prefill path: same weight values, fp32 sgemm (Paddle's MKL) instead of the streaming kernel."""
    fmt = layer.cpu_kernel
    if fmt == "bf16":
        weight = dequantize(layer.weight, None, 16)
    else:
        weight = dequantize(layer.weight, layer.weight_scale, QUANT_FORMATS[fmt])
    out = paddle.matmul(x, weight, transpose_y=True)
    return out if layer.bias is None else out + layer.bias


def linear(layer: nn.Layer, x: paddle.Tensor) -> paddle.Tensor:
    """Linear.forward for a layer that `prepare_linear` converted (`layer.cpu_kernel` names the format)."""
    if x.dtype != paddle.float32:
        x = x.astype("float32")
    fmt = layer.cpu_kernel
    if fmt != "w4a8" and x.size >= DENSE_MIN_ROWS * x.shape[-1]:
        return linear_dense(layer, x)
    if fmt == "bf16":
        return linear_bf16(x, layer.weight, layer.bias)
    if fmt == "w4a8":  # int8 activations (per token) times int4 weights: integer-exact sums, then both scales
        from .quant.weights import quantize_activation

        flat = x.reshape([-1, x.shape[-1]])
        xq, x_scale = quantize_activation(flat, layer.input_sharded)
        out = linear_int(xq, layer.weight, layer.weight_scale, 4) * x_scale
        out = out.reshape(x.shape[:-1] + [out.shape[-1]])
        return out if layer.bias is None else out + layer.bias
    return linear_int(x, layer.weight, layer.weight_scale, QUANT_FORMATS[fmt], layer.bias)


def _replace(layer: nn.Layer, name: str, value: paddle.Tensor, persistable: bool = True) -> None:
    """Swap a parameter or buffer for `value` (a buffer), releasing the old tensor."""
    if name in layer._parameters:
        delattr(layer, name)
    layer.register_buffer(name, value, persistable=persistable)


def _checkpoint_layout(prepared: dict[str, nn.Layer], state: dict[str, paddle.Tensor]) -> None:
    """state_dict hook: repacked weights go out as loaded ([in, out], fp32 or layers/quant's int layout)."""
    for name, layer in prepared.items():
        key = f"{name}.weight"
        if key not in state:
            continue
        if layer.cpu_kernel == "bf16":
            state[key] = layer.weight.astype("float32").transpose([1, 0])
        else:
            state[key] = layer.weight.transpose([1, 0])
            state[f"{name}.weight_scale"] = layer.weight_scale.transpose([1, 0])


def _quant_supported(layer: nn.Layer) -> bool:
    """G's CPU layout (not XPU's), and groups the kernel can step through (whole 16/32-value vectors)."""
    if layer.quant_device_layout or layer.weight.ndim != 2:
        return False
    groups, bits = layer.weight_scale.shape[0], QUANT_FORMATS[layer.quant_method]
    return groups == 1 or (layer.in_features // groups) % (32 if bits == 4 else 16) == 0


def prepare_linear(layer: nn.Layer, bf16_weights: bool) -> bool:
    """Repack one Linear for the kernels; returns whether it now runs on them."""
    method = layer.quant_method
    if method:
        if method not in QUANT_FORMATS or not _quant_supported(layer):
            return False
        _replace(layer, "weight", layer.weight.transpose([1, 0]).contiguous())
        _replace(layer, "weight_scale", layer.weight_scale.astype("float32").transpose([1, 0]).contiguous())
        layer.cpu_kernel = method
        return True
    if not bf16_weights:
        return False
    _replace(layer, "weight", layer.weight.astype("bfloat16").transpose([1, 0]).contiguous())
    if layer.bias is not None:
        layer.bias = layer.bias.astype("float32")
    layer.cpu_kernel = "bf16"
    return True


def prepare_model(model: nn.Layer, bf16_weights: bool) -> None:
    """After loading (and quantizing) on CPU: repack every Linear the kernels can run, in place.

    With `bf16_weights`, float Linears keep bf16 weights resident, and a tied LM head gets its own bf16
    copy of the embedding table (the fp32 table stays for lookups; the head is what each step streams).
    """
    if not available():
        return
    from .linear import Linear

    started, prepared = time.monotonic(), {}
    for name, layer in model.named_sublayers():
        if isinstance(layer, Linear) and not layer.cpu_kernel and prepare_linear(layer, bf16_weights):
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
        _replace(head, "weight", embed.weight.astype("bfloat16"), persistable=False)
        head.cpu_kernel = "bf16"
        model.lm_head = head
        count += 1
    logger.info(
        "cpu kernels: %d linear layers repacked (float weights as %s) in %.1f s",
        count,
        "bf16" if bf16_weights else "fp32 via Paddle",
        time.monotonic() - started,
    )


# ---- attention ----


def attention_supported(q: paddle.Tensor, key_cache: paddle.Tensor) -> bool:
    # Device and dtype first: on XPU this never triggers a build.
    return on_cpu(q) and q.dtype == paddle.float32 and key_cache.dtype == paddle.float32 and available()


def paged_attention(
    q: paddle.Tensor,
    key_cache: paddle.Tensor,
    value_cache: paddle.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> paddle.Tensor:
    """q [T, H, D] against the keys/values at `meta.kv_index` of [S, KVH, D] caches -> [T, H, D]."""
    return ops().ernie_paged_attention(q, key_cache, value_cache, meta.kv_index, meta.lens, scale)


def read_sum(buffer: paddle.Tensor) -> paddle.Tensor:
    """Sum of an int64 buffer over all threads: the memory-bandwidth probe of scripts/bench_kernels.py."""
    return ops().ernie_read_sum(buffer)
