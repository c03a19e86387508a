"""Locate the tritonserver that nvidia-pytriton ships and assemble a backends folder for the `ernie` backend.

Used by scripts/setup.sh, scripts/serve.sh, scripts/perf_analyzer.sh and tests/fixtures/triton.py, so the
server is started the same way everywhere.

    python scripts/triton_env.py assemble [DEST]   # DEST default: <repo>/.runtime/backends
    python scripts/triton_env.py env               # shell `export` lines for the server's environment
    python scripts/triton_env.py server            # path of the tritonserver binary
    python scripts/triton_env.py perf_analyzer     # path of tritonclient's perf_analyzer
    python scripts/triton_env.py args REPO HTTP GRPC METRICS [MODEL ...]  # tritonserver argv, NUL-separated
    python scripts/triton_env.py wait HTTP_URL MODEL [TIMEOUT]   # until MODEL is READY (exit 1 if it fails)
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BACKENDS = REPO / ".runtime" / "backends"
PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def pytriton_dir() -> Path:
    """The pytriton package folder (found without importing pytriton, whose import may fail here)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed in this Python: run scripts/setup.sh")
    return Path(spec.submodule_search_locations[0])


def tritonserver_bin() -> Path:
    return pytriton_dir() / "tritonserver" / "bin" / "tritonserver"


def python_backend_dir() -> Path:
    return pytriton_dir() / "tritonserver" / "backends" / "python"


def stub_path() -> Path:
    """The Python backend stub built for the running Python version."""
    stubs = pytriton_dir() / "tritonserver" / "python_backend_stubs"
    stub = stubs / PY_VERSION / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton has no backend stub for Python {PY_VERSION} (looked at {stub})")
    return stub


def library_path() -> str:
    """LD_LIBRARY_PATH for tritonserver and a copied stub: pytriton's libs + this Python's libpython."""
    libs = [str(pytriton_dir().parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    existing = os.environ.get("LD_LIBRARY_PATH", "")
    return ":".join(p for p in [*libs, existing] if p)


def perf_analyzer_bin() -> Path:
    """tritonclient's bundled perf_analyzer (installed next to the venv's python)."""
    return Path(sys.executable).parent / "perf_analyzer"


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.is_symlink() or (dst.exists() and not filecmp.cmp(src, dst, shallow=False)):
        dst.unlink()
    if not dst.exists():
        shutil.copy2(src, dst)


def assemble_backends(dest: Path = DEFAULT_BACKENDS, backend_src: Path = REPO / "backend") -> Path:
    """Build `dest/python` (pytriton's Python backend + this Python's stub) and `dest/ernie` -> backend_src.

    `ernie` is a symlink to the repo's backend/ folder (model.py next to the ernie_engine package), so edits
    take effect at the next model load without re-running setup.
    """
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in python_backend_dir().iterdir():
        if item.is_file():
            _copy_if_changed(item, python_dir / item.name)
    _copy_if_changed(stub_path(), python_dir / "triton_python_backend_stub")
    ernie = dest / "ernie"
    target = os.path.relpath(backend_src.resolve(), dest.resolve())  # relative: the checkout may move
    if ernie.is_symlink() and os.readlink(ernie) != target:
        ernie.unlink()
    if not ernie.exists():
        ernie.symlink_to(target, target_is_directory=True)
    return dest


def server_env(model_root: Path | None = None) -> dict[str, str]:
    """Environment for tritonserver: the libraries, the venv first on PATH (the stub runs `python3`)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = library_path()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("ERNIE_MODEL_ROOT", str(model_root or REPO / "checkpoints"))
    return env


def server_args(
    model_repository: Path,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    models: tuple[str, ...] = (),
    backends: Path = DEFAULT_BACKENDS,
    log_verbose: int = 0,
) -> list[str]:
    """tritonserver command line: loopback only, explicit model control (rows load by name or API)."""
    args = [
        str(tritonserver_bin()),
        f"--model-repository={model_repository}",
        f"--backend-directory={backends}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",
        "--allow-cpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        "--model-control-mode=explicit",
        "--exit-on-error=false",  # a row that fails to load must not take the others down,
        "--strict-readiness=false",  # nor mark the server unready (per-model readiness still tells)
        "--exit-timeout-secs=10",  # bounded shutdown even with open streams
        f"--log-verbose={log_verbose}",
    ]
    return args + [f"--load-model={name}" for name in models]


def model_state(http_url: str, model: str) -> tuple[str, str]:
    """(state, reason) of a model from the repository index; ("", "") while the server does not answer,
    ("ABSENT", "") when the repository has no such model folder."""
    request = urllib.request.Request(f"{http_url}/v2/repository/index", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            index = json.loads(response.read())
    except (OSError, ValueError):
        return "", ""
    for entry in index:
        if entry.get("name") == model:
            return entry.get("state", ""), entry.get("reason", "")
    return "ABSENT", ""


def wait_for_model(
    http_url: str, model: str, timeout: float, alive: Callable[[], bool] = lambda: True
) -> None:
    """Block until `model` is READY; raise naming the reason if it fails to load or the server dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("tritonserver exited before the model was ready")
        state, reason = model_state(http_url, model)
        if state == "READY":
            return
        if state == "UNAVAILABLE":
            raise RuntimeError(f"model {model!r} failed to load: {reason}")
        if state == "ABSENT":  # the index lists every folder of the repository: waiting cannot help
            raise RuntimeError(f"model {model!r} is not in the model repository")
        time.sleep(0.25)
    raise TimeoutError(f"model {model!r} not ready after {timeout:.0f} s")


# command -> (least, most) arguments after it
ARITY = {"wait": (2, 3), "args": (4, None), "assemble": (0, 1), "env": (0, 0), "server": (0, 0),
         "perf_analyzer": (0, 0)}


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("env", [])
    if command in ("-h", "--help"):
        print(__doc__)
        return 0
    least, most = ARITY.get(command, (0, -1))  # an unknown command fits no count
    if len(rest) < least or (most is not None and len(rest) > most):
        print(f"triton_env.py: bad command line {argv}\n{__doc__}", file=sys.stderr)
        return 2
    try:
        if command == "wait":  # wait HTTP_URL MODEL [TIMEOUT]
            wait_for_model(rest[0], rest[1], float(rest[2]) if len(rest) > 2 else 600)
        elif command == "args":  # args REPOSITORY HTTP_PORT GRPC_PORT METRICS_PORT [MODEL ...], NUL-separated
            ports = [int(port) for port in rest[1:4]]
            print("\0".join(server_args(Path(rest[0]), *ports, models=tuple(rest[4:]))), end="")
        elif command == "assemble":
            print(assemble_backends(Path(rest[0]) if rest else DEFAULT_BACKENDS))
        elif command == "env":
            print(f"export LD_LIBRARY_PATH={library_path()}")
        elif command == "server":
            print(tritonserver_bin())
        else:
            print(perf_analyzer_bin())
    except ValueError as err:  # a port or timeout that is not a number
        print(f"triton_env.py {command}: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
