"""`actvar-export serve`: find a `tritonserver`, prepare what it needs, start it, wait for readiness, stop it.

With the nvidia-pytriton wheel's server (Triton 2.51, Python backend only) the models' Python is a small
virtual environment with numpy<2 (2.51's Python backend corrupts tensors under numpy 2), made once in the
cache directory; a .pth file there adds the project's source tree (when it runs from one), PYTHONPATH's
directories and this interpreter's site directories after its own, so the project and its dependencies import
with that numpy (the stub's embedded interpreter ignores PYTHONPATH). A private backend directory links the wheel's
Python backend and the stub built for this Python.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import ActVarError

NO_SERVER = ("no Triton server found: install the nvidia-pytriton wheel (pip install -e '.[triton]') "
             "or put a Triton install's tritonserver on PATH")
SERVER_FLAGS = ["--allow-metrics=false", "--disable-auto-complete-config", "--exit-on-error=true",
                "--strict-readiness=true", "--exit-timeout-secs=5"]


def cache_dir() -> Path:
    env = os.environ.get("ACTVAR_EXPORT_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "actvar-export"
    base.mkdir(parents=True, exist_ok=True)
    return base


@dataclass
class ServerInstall:
    binary: Path
    wheel: Optional[Path] = None     # pytriton/tritonserver of the nvidia-pytriton wheel, when that is the server


def find_server() -> ServerInstall:
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerInstall(Path(on_path))
    spec = importlib.util.find_spec("pytriton")   # located, not imported (it needs numpy<2)
    if spec and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        if (root / "bin" / "tritonserver").is_file():
            return ServerInstall(root / "bin" / "tritonserver", root)
    raise ActVarError(NO_SERVER)


def _atomic_dir(target: Path, make: Callable[[Path], None]) -> Path:
    """Build a directory in a temporary sibling and rename it; another process that won the race wins."""
    if target.is_dir():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        make(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def models_env(say: Callable[[str], None] = print) -> Path:
    """The models' virtual environment (numpy<2 + this interpreter's site directories); made on first use."""
    root = package_root()   # the embedded interpreter ignores PYTHONPATH: a source tree goes into the .pth,
    # and PYTHONPATH's directories (e.g. an onnxruntime-gpu installed with --target) before the site directories
    extra = [d for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) if d and str(Path(d).resolve()) != root]
    dirs = [d for d in extra + site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
            if Path(d).is_dir()]
    key = hashlib.sha256("\n".join([sys.executable, str(root)] + dirs).encode()).hexdigest()[:10]
    target = cache_dir() / f"models-py{sys.version_info[0]}.{sys.version_info[1]}-{key}"

    def run(*cmd) -> str:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        if r.returncode:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ActVarError(f"cannot set up the models' Python environment in {target}: {last[0]}")
        return r.stdout.strip()

    def make(tmp: Path):
        say(f"setting up the models' Python environment in {target} (numpy<2; once) ...")
        run(sys.executable, "-m", "venv", "--without-pip", tmp)
        purelib = run(tmp / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
        run(sys.executable, "-m", "pip", "--python", tmp / "bin" / "python", "install", "-q",
            "--disable-pip-version-check", "numpy<2")
        Path(purelib, "actvar_export_parent.pth").write_text(
            (f"{root}\n" if root else "") + "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    return _atomic_dir(target, make)


def backend_dir(install: ServerInstall) -> Path:
    """BK/python/ linking the wheel's Python backend and the stub for this Python."""
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = install.wheel / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise ActVarError(f"{install.wheel}: no Python backend stub for Python {ver}")
    key = hashlib.sha256(f"{install.wheel}\n{ver}".encode()).hexdigest()[:10]

    def make(tmp: Path):
        py = tmp / "python"
        py.mkdir()
        for src in (install.wheel / "backends" / "python" / "libtriton_python.so",
                    install.wheel / "backends" / "python" / "triton_python_backend_utils.py", stub):
            (py / src.name).symlink_to(src)
    return _atomic_dir(cache_dir() / f"backends-{key}", make)


def package_root() -> Optional[str]:
    """The directory holding actvar_export, when it is a source tree (not a site directory)."""
    root = Path(__file__).resolve().parents[2]
    return None if root.name in ("site-packages", "dist-packages") else str(root)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """A running tritonserver over a model repository (context manager); `http_url` / `grpc_url` once ready."""

    def __init__(self, repo, http_port: Optional[int] = None, grpc_port: Optional[int] = None,
                 extra_args: Sequence[str] = (), log_path: Optional[Path] = None,
                 say: Callable[[str], None] = print):
        self.repo = Path(repo).resolve()
        if not (self.repo.is_dir() and any(self.repo.glob("*/config.pbtxt"))):
            raise ActVarError(f"--repo {repo}: not a model repository (no <model>/config.pbtxt)")
        self.http_port, self.grpc_port, self.extra_args, self.say = http_port, grpc_port, list(extra_args), say
        self.log_path = Path(log_path) if log_path else cache_dir() / "logs" / f"tritonserver-{os.getpid()}.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command_and_env(self):
        install = find_server()
        env = dict(os.environ)
        cmd = [str(install.binary), f"--model-repository={self.repo}"]
        if install.wheel is not None:
            venv = models_env(self.say)
            cmd.append(f"--backend-directory={backend_dir(install)}")
            env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [sysconfig.get_config_var("LIBDIR"),
                                                                 env.get("LD_LIBRARY_PATH", "")] if p)
        return cmd, env

    def start(self, timeout: float = 300) -> "TritonServer":
        base, env = self.command_and_env()
        pick = self.http_port is None or self.grpc_port is None
        for attempt in range(3):
            if pick:
                self.http_port, self.grpc_port = free_port(), free_port()
            cmd = base + ["--http-address=127.0.0.1", f"--http-port={self.http_port}", "--grpc-address=127.0.0.1",
                          f"--grpc-port={self.grpc_port}"] + SERVER_FLAGS + self.extra_args
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            if self._wait_ready(timeout):
                return self
            tail = self.log_tail()
            self.stop()
            if pick and "address already in use" in tail.lower() and attempt < 2:
                continue
            raise ActVarError(f"tritonserver did not become ready ({tail.strip().splitlines()[-1] if tail.strip() else 'no output'}; "
                              f"log: {self.log_path})")

    def _wait_ready(self, timeout: float) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                return False
            if self.ready():
                return True
            time.sleep(0.2)
        return False

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10) -> Optional[int]:
        """SIGTERM, then SIGKILL of its process group after `timeout`; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:   # the Python backend's stubs are in the server's process group: none may outlive it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve(repo, http_port: Optional[int], grpc_port: Optional[int], say: Callable[[str], None] = print,
          extra_args: Sequence[str] = (), gpus: Optional[Sequence[int]] = None) -> int:
    """Run until Ctrl-C or SIGTERM; returns the server's exit status (0 on a clean stop). gpus: serve a view of
    the repository with every model's instances on these GPUs (repository.placed_view; removed at the end)."""
    view = None
    if gpus is not None:
        from .repository import placed_view
        TritonServer(repo)     # (checks --repo first)
        from ..fsutil import temp_dir
        view = temp_dir(cache_dir() / "repository-view")     # (a dead server's view is removed by the next)
        try:
            repo = placed_view(repo, gpus, view / "repo")
        except BaseException:
            shutil.rmtree(view, ignore_errors=True)
            raise
        say(f"instances on GPU {', '.join(map(str, gpus))}: serving {repo} (a view of the repository)")
    try:
        return _serve(repo, http_port, grpc_port, say, extra_args)
    finally:
        if view is not None:
            shutil.rmtree(view, ignore_errors=True)


def _serve(repo, http_port, grpc_port, say, extra_args) -> int:
    srv = TritonServer(repo, http_port, grpc_port, extra_args=extra_args, say=say)
    stopping = []

    def on_term(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        srv.start()
        say(f"tritonserver ready (pid {srv.proc.pid}): HTTP {srv.http_url}  gRPC {srv.grpc_url}  "
            f"models in {srv.repo}; log {srv.log_path}; Ctrl-C or SIGTERM stops it")
        while srv.proc.poll() is None:
            time.sleep(0.5)
        raise ActVarError(f"tritonserver exited with {srv.proc.returncode} (log: {srv.log_path})")
    except KeyboardInterrupt:
        rc = srv.stop()
        say(f"tritonserver stopped (exit {rc})")
        if rc == 0:
            srv.log_path.unlink(missing_ok=True)
        return rc
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()
        signal.signal(signal.SIGTERM, old)
