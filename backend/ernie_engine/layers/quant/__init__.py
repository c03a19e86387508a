"""Quantization: weight-only int8 / int4 (wint8, wint4), W4A8, and the int8 KV cache (C8).

Methods (`EngineConfig.quantization`, case-insensitive): "" (none), "wint8", "wint4", "w4a8".
`kv_cache_dtype="int8"`, a method spelled "w4a8c8", or a checkpoint whose `quantization_config` says
`kv_cache_quant_type: "int8"` turns on C8.

Weights. A Linear holds its weight as [in, out]; stacked expert weights are [E, in, out]. Quantization is
symmetric along the input axis with one fp32 scale per output channel, or per group of `group_size` input rows
(wint4 only): scale = absmax / qmax (qmax 127 for int8, 7 for int4), q = clip(round(w / scale)), halves
away from zero as Paddle's `weight_quantize` (also for W4A8 activations and C8), so every element's
round-trip error is at most scale / 2. A NaN or inf weight or scale fails the load, naming the layer.
Int4 values are packed two per byte into int8 storage along the input axis: row 2i in the low nibble, row
2i+1 in the high nibble, giving [..., in/2, out]. Scales are stored as [..., G, out] (G = 1 per channel,
else in / group_size). Only the projections named in
`QUANTIZED_SUFFIXES` are quantized; embeddings, norms, the MoE router (`mlp.gate`), lm_head and the vision
tower stay in the model dtype, as FastDeploy does (`quantize_lm_head` opts the LM head in).

Execution. On XPU the weight-only methods repack with `paddle.nn.quant.weight_quantize` and run
`weight_only_linear`. Paddle has no such CPU kernels: on CPU quantized Linears and routed experts run the
custom kernel (layers/cpu_kernels.py: int8 / int4 values packed like bf16 weights, bf16-rounded activations)
when it is available; otherwise each call dequantizes that one weight into a transient fp32 buffer for an fp32
matmul. Either way the resident weights stay int8.
W4A8 quantizes the
activation per token on the fly (scale = row absmax / 127) and multiplies int8 x int4 values: every partial
sum is an integer below 127 * 7 * in_features < 2**24 for in_features <= 18,000, so the fp32 matmul
accumulates it exactly, and the result equals an integer reference before the two scales are applied.

Pre-quantized checkpoints (config.json `quantization_config` with `is_quantized: true`). Accepted layout, per
quantized projection `<name>` (e.g. `ernie.layers.0.self_attn.qkv_proj`):
  `<name>.weight`        int8, [in, out] for 8-bit, or [in/2, out] packed int4 as above (-Paddle orientation)
  `<name>.weight_scale`  fp32/bf16, [out] (per channel) or [in/group_size, out]
Routed experts use the same two tensors per expert (`<layer>.mlp.experts.<j>.up_gate_proj.weight` /
`.weight_scale`, likewise `down_proj`); the loader stacks them into [E, ...] buffers.
Optional keys (`dense_quant_type`, `moe_quant_type`) select per-part methods as in FastDeploy's "mix_quant".
C8 static scales, per layer and per KV head ([num_kv_heads]), holding the absmax of the keys / values seen in
calibration (FastDeploy's convention; the dequantization step is absmax / 127):
  `<layer>.self_attn.cachek_matmul.activation_scale`, `<layer>.self_attn.cachev_matmul.activation_scale`
  (also accepted: `<layer>.self_attn.cache_k_scale`, `<layer>.self_attn.cache_v_scale`).
Static activation scales for W4A8 (`...activation_scale` on projections) are not used: activations are
quantized dynamically per token.

KV cache (C8). Keys and values are stored as int8 [num_slots, num_kv_heads, head_dim]. With checkpoint scales
the step per head is fixed. Without them each written token gets its own scale per head (absmax over
head_dim / 127), kept in an fp32 [num_slots, num_kv_heads, 1] tensor beside the cache: no calibration,
and an outlier token cannot crush the resolution of other tokens. Bytes per token per layer:
2 * kvh * (head_dim + 4) against 2 * kvh * head_dim * 4 for fp32, i.e. (128 + 4) / 512 = 0.258x at
head_dim 128 (the scales cost 3.1%).
"""
