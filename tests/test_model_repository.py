"""model_repository/ covers the seed's Supported Models table: one config per row, with the row's settings.

The table is parsed from the seed document itself (flags from each row's command cell), so a row added to or
changed in the seed fails here until its config follows.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ernie_engine.config import EngineConfig
from ernie_engine.layers.quant.config import QuantConfig
from ernie_engine.parsers import get_reasoning_parser_class, get_tool_parser_class
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tests.process_utils import wait_for

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


# The scripts' command lines: help, and a bad argument refused at once with a message (no traceback, no wait).
SHELL_SCRIPTS = ("serve.sh", "perf_analyzer.sh", "install_backend.sh", "lm_eval_harness.sh", "bench_peers.sh")


def run_script(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """`bash scripts/...`, its process group killed if it outlives `timeout` (a server it started too)."""
    process = subprocess.Popen(["bash", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_help_prints_usage_and_does_nothing_else(script: str):
    """`--help` used to be taken as a row / model / folder name (serve.sh started serving, perf_analyzer.sh
    asked Triton for a model named --help, bench_peers.sh would have started its benchmark)."""
    result = run_script([f"scripts/{script}", "--help"], timeout=20)
    assert result.returncode == 0, result.stderr
    assert "Usage: scripts/" + script in result.stdout and not result.stdout.startswith("#!")


@pytest.mark.parametrize("row", ["ernie-4.5-0.3b-typo", "--port", "../model_repository/ernie-4.5-tiny"])
def test_serve_refuses_an_unknown_row_before_starting_anything(row: str):
    """A misspelled row used to start tritonserver, then wait LOAD_TIMEOUT (600 s) for a model Triton did not
    have: now the script exits at once naming it and the rows there are."""
    result = run_script(["scripts/serve.sh", row], timeout=30)
    assert result.returncode == 2
    assert f"no row '{row}'" in result.stderr and DEFAULT_ROW in result.stderr and not result.stdout


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--concurrency", "1,x"], ["--num-requests", "0"],
                                  ["--max-tokens", "-1"], ["--token-range", "5", "1"], ["--timeout", "0"]])
def test_bench_serving_refuses_bad_load_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]):
    """`--concurrency 0` used to wait forever on a level that sends nothing; the others were tracebacks
    (or a level of HTTP 400s) after the warm-up."""
    from scripts.bench_serving import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--base-url", "http://127.0.0.1:1/v1", *argv])
    assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err


USAGE = "triton_env.py wait HTTP_URL MODEL"


@pytest.mark.parametrize("argv, code, says", [
    (["--help"], 0, USAGE), (["args", "model_repository"], 2, USAGE), (["x"], 2, USAGE),
    (["wait", "http://127.0.0.1:1", DEFAULT_ROW, "soon"], 2, "'soon'"),
])
def test_triton_env_command_line(argv: list[str], code: int, says: str):
    """Help on stdout with status 0 (it was an error), a wrong command line a message (it was a traceback)."""
    result = subprocess.run([sys.executable, "scripts/triton_env.py", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    assert says in (result.stdout if code == 0 else result.stderr)


def test_soak_reports_a_dead_backend_stub_instead_of_failing():
    """Triton leaves a stub that died unreaped (a zombie): soak.py's snapshot read its /proc net table and
    stopped with a FileNotFoundError, in the very run meant to watch the stack's processes."""
    from scripts.soak import process_stats

    child = subprocess.Popen(["true"])  # not waited for: a zombie once it exits
    state = lambda: Path(f"/proc/{child.pid}/status").read_text().split("State:")[1].split()[0]  # noqa: E731
    assert wait_for(lambda: state() == "Z", 10)
    assert process_stats(child.pid) == {"state": "exited"}
    child.wait()


def test_bench_engine_takes_max_tokens_with_quick_and_refuses_bad_lengths(capsys: pytest.CaptureFixture[str]):
    """`--quick` silently replaced an explicit --max-tokens with 12; --rounds 0 was an IndexError after the
    whole run and a length past the engine's max_model_len a traceback from the engine."""
    from scripts.bench_engine import parse_args

    assert parse_args(["--quick", "--max-tokens", "4"]).max_tokens == 4
    assert (parse_args(["--quick"]).max_tokens, parse_args([]).max_tokens) == (12, 64)
    for argv in (["--rounds", "0"], ["--prompt-len", "1020"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("env", [{"CONCURRENCY": "4:1"}, {"CONCURRENCY": "0"}, {"REQUEST_COUNT": "0"}])
def test_perf_analyzer_script_refuses_a_load_that_measures_nothing(env: dict[str, str]):
    """CONCURRENCY 4:1 used to run no level and exit 0; 0 levels or requests reached perf_analyzer."""
    result = subprocess.run(["bash", "scripts/perf_analyzer.sh"], cwd=ROOT, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=60)
    (name,) = env
    assert result.returncode == 2 and f"{name} must be" in result.stderr, result.stderr


def test_bench_kernels_parses_its_cases_up_front(capsys: pytest.CaptureFixture[str]):
    """Bad rows / repeats / prefill cases were tracebacks after the bandwidth and linear benches had run (an
    unknown format was silently dropped)."""
    from scripts.bench_kernels import parse_args

    args = parse_args(["--rows", "1,4", "--prefill", "2x8,1x4+16", "--formats", "wint4,bf16"])
    assert (args.rows, args.prefill, args.formats) == ([1, 4], [(2, 8, 0), (1, 4, 16)], ["bf16", "wint4"])
    for argv in (["--rows", "0"], ["--repeats", "0"], ["--prefill", "2x"], ["--formats", "bf16,int3"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("script, argv", [
    ("bench_moe", ["--layers", "0"]), ("bench_moe", ["--steps", "0"]),
    ("bench_ocr", ["--rounds", "0"]), ("bench_ocr", ["--concurrency", "0"]),
])
def test_benchmarks_refuse_empty_runs(script: str, argv: list[str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]):
    """These were IndexErrors at the end of a run (bench_ocr's after building a 0.9B checkpoint)."""
    main = importlib.import_module(f"scripts.{script}").main
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--checkpoint", str(tmp_path / "ckpt")] if script == "bench_ocr" else argv)
    assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("argv", [["--methods", "wint8,wint3"], ["--methods", "wint8+head"],
                                  ["--positions", "0"], ["--batches", "1,x"]])
def test_bench_quant_refuses_bad_arguments_before_the_reference_run(argv: list[str],
                                                                     capsys: pytest.CaptureFixture[str]):
    """They were a traceback or a ZeroDivisionError after the fp32 reference had run."""
    from scripts.bench_quant import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--model", "/nonexistent-checkpoint"])
    assert exit_info.value.code == 2 and ": error: " in capsys.readouterr().err


def test_tp_memory_refuses_bad_arguments_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Both were tracebacks, --tp 0 only after the whole single-device model had been loaded."""
    from scripts.tp_memory import main

    (tmp_path / "config.json").write_text("{}")
    for argv, flag in ((["--model", str(tmp_path / "absent")], "--model"),
                       (["--model", str(tmp_path), "--tp", "2", "0"], "--tp")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_build_kernels_refuses_a_folder_without_the_engine(tmp_path: Path, capsys: pytest.CaptureFixture):
    """It was a ModuleNotFoundError traceback (install_backend.sh passes --backend)."""
    from scripts.build_kernels import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--backend", str(tmp_path)])
    assert exit_info.value.code == 2 and "no ernie_engine package" in capsys.readouterr().err
