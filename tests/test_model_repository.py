"""model_repository/ covers the seed's Supported Models table: one config per row, with the row's settings.

The table is parsed from the seed document itself (flags from each row's command cell), so a row added to or
changed in the seed fails here until its config follows.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ernie_engine.config import EngineConfig
from ernie_engine.layers.quant.config import QuantConfig
from ernie_engine.parsers import get_reasoning_parser_class, get_tool_parser_class
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "model_repository"
SEED = Path(os.environ.get("ERNIE_SEED_DOC", ROOT.parent / "shared" / "seed" / "kunlunxin_xpu_deployment.md"))
# Process plumbing of FastDeploy's own server that Triton replaces (ports, its worker queues).
IGNORED_FLAGS = {"port", "metrics_port", "engine_worker_queue_port", "cache_queue_port"}
DEFAULT_ROW = "ernie-4.5-tiny"
THINKING_ROW = "ernie-4.5-tiny-thinking"  # the demo model with the seed's thinking-row parsers
DEMO_ROWS = (DEFAULT_ROW, THINKING_ROW)  # the folders besides the seed's rows
FOLDERS = [p for p in sorted(REPOSITORY.iterdir()) if p.is_dir()]


@dataclass
class SeedRow:
    model_name: str  # the table's first column, e.g. ERNIE-4.5-300B-A47B
    context: str  # the table's context column, e.g. 32K
    params: dict[str, str] = field(default_factory=dict)  # config.pbtxt parameters the row implies

    @property
    def folder(self) -> str:
        """Lowercase name from model, quantization, device count and context (the command's max-model-len)."""
        name = self.model_name.lower()
        parts = [name]
        quant = self.params.get("quantization", "bf16")
        if quant not in name:
            parts.append(quant)
        tp = f"tp{self.params.get('tensor_parallel_size', '1')}"
        if tp not in name:
            parts.append(tp)
        parts.append(f"{int(self.params['max_model_len']) // 1024}k")
        return "-".join(parts)


def parse_command(cell: str) -> dict[str, str]:
    """Config parameters from one Deployment Commands cell (or a Quick start bash block)."""
    text = cell.replace("<br>", "\n").replace("\\\n", " ").replace("\\ \n", " ")
    params: dict[str, str] = {}
    devices = re.search(r'XPU_VISIBLE_DEVICES="([^"]+)"', text)
    if devices:  # `"0,1,2,3" or "4,5,6,7"`: the first choice
        params["devices"] = devices.group(1)
    if re.search(r"export FD_ENABLE_MAX_PREFILL=1", text):
        params["enable_max_prefill"] = "true"
    command = text[text.index("python -m fastdeploy") :]
    tokens = shlex.split(command.replace("\\", " "), comments=True)
    i = 0
    while i < len(tokens):
        if tokens[i].startswith("--"):
            name = tokens[i][2:].replace("-", "_")
            has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
            value = tokens[i + 1] if has_value else "true"
            if name not in IGNORED_FLAGS:
                params[name] = value.lower() if name == "quantization" else value
            i += 2 if has_value else 1
        else:
            i += 1
    return params


def seed_rows() -> list[SeedRow]:
    assert SEED.is_file(), f"seed document not found at {SEED} (set ERNIE_SEED_DOC)"
    text = SEED.read_text()
    table = text[text.index("## Supported Models") : text.index("## Quick start")]
    lines = [line for line in table.splitlines() if line.startswith("|")][2:]  # minus header and rule
    quick_starts = [parse_command(block) for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                    if "fastdeploy" in block]
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = SeedRow(cells[0], cells[1], parse_command(cells[4]))
        row.params.update(quick_start_extras(row.params, quick_starts))
        rows.append(row)
    return rows


def quick_start_extras(params: dict[str, str], quick_starts: list[dict[str, str]]) -> dict[str, str]:
    """Flags a Quick start adds to the same deployment (e.g. --load-choices)."""
    keys = set(params) - {"devices"}
    for quick in quick_starts:
        if all(quick.get(k) == params[k] for k in keys):
            return {k: v for k, v in quick.items() if k not in params}
    return {}


def read_config(folder: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def config_params(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: p.string_value for key, p in config.parameters.items()}


def test_seed_has_19_rows_with_distinct_folders():
    rows = seed_rows()
    assert len(rows) == 19
    assert len({r.folder for r in rows}) == 19, [r.folder for r in rows]


def test_every_folder_is_a_seed_row_or_a_demo_row():
    assert [p.name for p in FOLDERS] == sorted([r.folder for r in seed_rows()] + list(DEMO_ROWS))


@pytest.mark.parametrize("row", seed_rows(), ids=lambda r: r.folder)
def test_row_config_matches_seed(row: SeedRow):
    config = read_config(REPOSITORY / row.folder)
    params = config_params(config)
    # Every seed setting is spelled out in the config, with the same value.
    for key, value in row.params.items():
        assert params.get(key) == value, f"{row.folder}: {key} is {params.get(key)!r}, seed says {value!r}"
    # Nothing else but what the seed implies (tensor_parallel_size is written out even where the default).
    assert set(params) - set(row.params) <= {"tensor_parallel_size"}, set(params) - set(row.params)
    assert EngineConfig.from_parameters(params) == EngineConfig.from_parameters(row.params)
    # The table's context column agrees with max-model-len, except PaddleOCR-VL (table 32K, command 16384).
    if row.model_name != "PaddleOCR-VL-0.9B":
        assert row.context.lower() == row.folder.rsplit("-", 1)[1]


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_config_is_a_parameters_only_ernie_row(folder: Path):
    config = read_config(folder)
    assert config.name in ("", folder.name)
    assert config.backend == "ernie"
    assert config.max_batch_size == 0
    assert not config.input and not config.output, "tensors come from the backend's auto_complete_config"
    cpu = model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert [(g.kind, g.count) for g in config.instance_group] == [(cpu, 1)]
    assert (folder / "1").is_dir(), "Triton needs a version folder"
    engine_config = EngineConfig.from_parameters(config_params(config))
    assert engine_config.model and engine_config.max_model_len > 0


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_row_settings_are_ones_the_engine_accepts(folder: Path):
    """What the engine resolves at load: the quantization method, the parsers by name, one device per
    tensor-parallel rank."""
    config = EngineConfig.from_parameters(config_params(read_config(folder)))
    QuantConfig.build(config.quantization, config.kv_cache_dtype)
    if config.reasoning_parser:
        get_reasoning_parser_class(config.reasoning_parser)
    if config.tool_call_parser:
        get_tool_parser_class(config.tool_call_parser)
    if config.devices:
        assert len(config.devices.split(",")) == config.tensor_parallel_size


def test_default_row_uses_the_embedded_checkpoint():
    params = config_params(read_config(REPOSITORY / DEFAULT_ROW))
    assert params["model"] == DEFAULT_ROW  # under ERNIE_MODEL_ROOT (<repo>/checkpoints in the scripts)
    assert int(params["max_model_len"]) <= 8192 and int(params["kv_cache_memory_bytes"]) > 0


def test_hub_ids_are_looked_up_in_each_model_root_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`ERNIE_MODEL_ROOT=/models serve.sh ROW` puts the user's folder before <repo>/checkpoints: the rows'
    checkpoints come from the first, the embedded model's from the second (it used to be missing)."""
    user, ours = tmp_path / "models", tmp_path / "checkpoints"
    for folder in (user / "PaddlePaddle/ERNIE-4.5-0.3B-Paddle", ours / DEFAULT_ROW, ours / "PaddlePaddle/X"):
        folder.mkdir(parents=True)
    monkeypatch.setenv("ERNIE_MODEL_ROOT", f"{user}{os.pathsep}{ours}")

    def resolve(model: str) -> Path:
        return EngineConfig(model=model).resolve_model_path()

    assert resolve("PaddlePaddle/ERNIE-4.5-0.3B-Paddle") == user / "PaddlePaddle/ERNIE-4.5-0.3B-Paddle"
    assert resolve(DEFAULT_ROW) == ours / DEFAULT_ROW and resolve("PaddlePaddle/X") == ours / "PaddlePaddle/X"
    with pytest.raises(FileNotFoundError, match=re.escape(str(user / "absent"))):
        resolve("absent")


def test_thinking_row_is_the_default_model_with_the_seed_thinking_parsers():
    params = config_params(read_config(REPOSITORY / THINKING_ROW))
    default = config_params(read_config(REPOSITORY / DEFAULT_ROW))
    (seed_row,) = [r for r in seed_rows() if r.model_name == "ERNIE-4.5-VL-28B-A3B-Thinking"]
    parsers = {k: seed_row.params[k] for k in ("reasoning_parser", "tool_call_parser")}
    assert parsers == {"reasoning_parser": "ernie-45-vl-thinking", "tool_call_parser": "ernie-45-vl-thinking"}
    assert params == {**default, **parsers}
