"""Operator misconfiguration: every wrong setting fails at load, naming the parameter and its value.

Settings come from a config.pbtxt (strings, `EngineConfig.from_parameters`) or from keyword arguments (the
offline `LLM`, as vLLM's engine args); both paths are checked the same way, before anything is loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from ernie_engine import EngineConfig, LLMEngine

BLOCK = 64  # EngineConfig's default block_size


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_num_seq": "4"}, "unknown model parameter 'max_num_seq'; did you mean 'max_num_seqs'?"),
        ({"max-num-seqs": "4", "max_num_seqs": "5"}, "'max_num_seqs' is given twice"),
        ({"max_num_seqs": "abc"}, "'max_num_seqs': expected an integer, got 'abc'"),
        ({"max_num_seqs": "1.5"}, "'max_num_seqs': expected an integer, got '1.5'"),
        ({"gpu_memory_utilization": "lots"}, "'gpu_memory_utilization': expected a number, got 'lots'"),
        ({"enable_prefix_caching": "maybe"}, "'enable_prefix_caching': expected a boolean (true / false)"),
        ({"limit_mm_per_prompt": "{image: 2}"}, "'limit_mm_per_prompt': expected a JSON object, got '{image"),
        ({"mm_processor_kwargs": "[1]"}, "'mm_processor_kwargs': expected a JSON object, got '[1]'"),
    ],
)
def test_unparsable_parameters_are_named(params: dict[str, str], message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineConfig.from_parameters({"model": "m", **params})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"gpu_memory_utilization": "0"}, "gpu_memory_utilization must be in (0, 1], got 0.0"),
        ({"gpu_memory_utilization": "1.5"}, "gpu_memory_utilization must be in (0, 1], got 1.5"),
        ({"gpu_memory_utilization": "nan"}, "gpu_memory_utilization must be in (0, 1], got nan"),
        ({"kv_cache_host_fraction": "2"}, "kv_cache_host_fraction must be in (0, 1], got 2.0"),
        ({"max_num_seqs": "0"}, "max_num_seqs must be >= 1, got 0"),
        ({"max_num_batched_tokens": "-5"}, "max_num_batched_tokens must be >= 0, got -5"),  # was a hang
        ({"block_size": "0"}, "block_size must be >= 1, got 0"),  # was a ZeroDivisionError
        ({"max_model_len": "-1"}, "max_model_len must be >= 0, got -1"),
        ({"num_gpu_blocks_override": "-1"}, "num_gpu_blocks_override must be >= 0, got -1"),
        ({"kv_cache_memory_bytes": "-1"}, "kv_cache_memory_bytes must be >= 0, got -1"),
        ({"tensor_parallel_size": "0"}, "tensor_parallel_size must be >= 1, got 0"),
        ({"load_choices": "fast"}, "load_choices 'fast' is not one of default, default_v1"),
        ({"devices": "0,0"}, "devices '0,0' must list distinct device numbers"),
        ({"devices": "xpu0"}, "devices 'xpu0' must list distinct device numbers"),
        ({"tensor_parallel_size": "2", "devices": "0"}, "tensor_parallel_size 2 needs as many devices"),
        ({"limit_mm_per_prompt": '{"images": 2}'}, "limit_mm_per_prompt: unknown modality 'images'"),
        ({"limit_mm_per_prompt": '{"image": -2}'}, "limit_mm_per_prompt: 'image' must be a count >= 0"),
        ({"limit_mm_per_prompt": '{"video": 1.5}'}, "limit_mm_per_prompt: 'video' must be a count >= 0"),
        ({"mm_processor_kwargs": '{"image_max_pixels": -1}'}, "'image_max_pixels' must be a positive number"),
        ({"mm_processor_kwargs": '{"video_fps": "x"}'}, "'video_fps' must be a positive number, got 'x'"),
        ({"media_root": "/no/such/folder"}, "media_root '/no/such/folder' is not a folder"),
    ],
)
def test_out_of_range_settings_are_refused(params: dict[str, str], message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineConfig.from_parameters({"model": "m", **params})


def test_keyword_arguments_mean_what_config_pbtxt_strings_mean():
    """`LLM(path, enable_prefix_caching="false")` used to keep caching on (a non-empty string is truthy)."""
    config = EngineConfig(model="m", enable_prefix_caching="false", max_num_seqs="4", devices="0,1",
                          gpu_memory_utilization=1)
    assert config.enable_prefix_caching is False and config.max_num_seqs == 4
    assert config.gpu_memory_utilization == 1.0
    assert EngineConfig(model="m", limit_mm_per_prompt='{"image": 2}').limit_mm_per_prompt == {"image": 2}
    with pytest.raises(ValueError, match=re.escape("'max_num_seqs': expected int, got 1.5 (float)")):
        EngineConfig(model="m", max_num_seqs=1.5)
    with pytest.raises(ValueError, match=re.escape("'enable_chunked_prefill': expected bool, got 1 (int)")):
        EngineConfig(model="m", enable_chunked_prefill=1)


def test_checkpoint_folder_problems_are_named(random_model_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="'model' is required"):  # used to load from the working directory
        LLMEngine(EngineConfig())
    partial = tmp_path / "partial"
    shutil.copytree(random_model_dir, partial)
    (partial / "config.json").unlink()
    (partial / "tokenizer.model").unlink()
    missing = f"{partial} lacks config.json and tokenizer.model"  # both at once
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        LLMEngine(EngineConfig(model=str(partial)))


@pytest.mark.parametrize(("values", "message"), [
    ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
    ({"max_new_tokens": 0}, "max_tokens must be >= 1, got 0"),
    ({"temperature": "hot"}, "temperature must be a finite number"),
    (None, "Expecting property name enclosed in double quotes"),  # not JSON
])
def test_bad_generation_config_values_fail_at_load(random_model_dir: Path, tmp_path: Path,
                                                   values: dict | None, message: str):
    """They used to fail every request instead, naming a parameter the request never sent."""
    shutil.copytree(random_model_dir, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}) if values else "{top_p: 0}")
    with pytest.raises(ValueError, match=re.escape(f"generation_config.json of {tmp_path}: {message}")):
        LLMEngine(EngineConfig(model=str(tmp_path), num_gpu_blocks_override=8))


def test_bad_dtype_fails_before_tensor_parallel_workers_start(random_model_dir: Path):
    with pytest.raises(ValueError, match="unsupported dtype 'fp16'"):  # was a WorkerFailure from each rank
        LLMEngine(EngineConfig(model=str(random_model_dir), tensor_parallel_size=2, dtype="fp16"))


def test_multimodal_settings_on_a_text_checkpoint_are_refused(random_model_dir: Path):
    for setting in ({"enable_mm": True}, {"limit_mm_per_prompt": {"image": 2}},
                    {"mm_processor_kwargs": {"image_max_pixels": 1000}}):
        name = next(iter(setting))
        with pytest.raises(ValueError, match=f"{name} set, but Ernie4_5ForCausalLM takes text only"):
            LLMEngine(EngineConfig(model=str(random_model_dir), num_gpu_blocks_override=8, **setting))


def test_a_max_model_len_asked_for_must_fit_the_kv_budget(random_model_dir: Path):
    """As vLLM: refused with what one sequence needs (it used to be lowered to 192 with a warning)."""
    model = str(random_model_dir)
    with pytest.raises(ValueError, match=r"max_model_len 4096 needs [\d.]+ MiB of KV cache for one sequence, "
                                         r"but the budget \(kv_cache_memory_bytes=100000\) holds"):
        LLMEngine(EngineConfig(model=model, max_model_len=4096, kv_cache_memory_bytes=100_000))
    unset = LLMEngine(EngineConfig(model=model, kv_cache_memory_bytes=100_000))  # the checkpoint's: lowered
    assert unset.max_model_len == unset.num_blocks * BLOCK < 4096


def test_the_host_byte_cap_never_cuts_a_row_below_one_full_sequence(random_model_dir: Path):
    """kv_cache_max_host_bytes is a cap of the automatic sizing: a row's max_model_len (e.g. the seed's 128k
    rows on CPU) still fits when the host memory share allows it, rather than being refused or shortened."""
    engine = LLMEngine(EngineConfig(model=str(random_model_dir), max_model_len=4096,
                                    kv_cache_max_host_bytes=1 << 16))
    assert engine.max_model_len == 4096 and engine.num_blocks * BLOCK == 4096


def test_a_kv_cache_larger_than_host_memory_is_refused_before_allocating(random_model_dir: Path):
    model = str(random_model_dir)
    for name, value in (("kv_cache_memory_bytes", 1 << 50), ("num_gpu_blocks_override", 1 << 40)):
        message = rf"GiB but the host has [\d.]+ GiB available \({name}={value}\)"
        with pytest.raises(ValueError, match=message):
            LLMEngine(EngineConfig(model=model, **{name: value}))
