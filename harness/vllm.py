"""Real vLLM on the CPU for tests: the model folder, the settings dynrt's workers and the
reference server share, and vLLM's own OpenAI server as the reference.

The model is SmolLM2-135M-Instruct converted once by ``deploy/vllm-cpu/build_model.py``
to an HF folder (cached in ``~/.cache/dynrt``, or ``$DYNRT_SMOLLM2_DIR``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import aiohttp

from dynrt.runtime.embedded import free_port
from dynrt.runtime.procs import stop_process
from harness.processes import spawn_python

ROOT = Path(__file__).resolve().parents[1]
BUILD_MODEL = ROOT / "deploy" / "vllm-cpu" / "build_model.py"
# float32, not bfloat16: in bf16 a greedy run continued from prompt + k of its own tokens
# (what migration sends) diverges from the uninterrupted run within a few dozen tokens
# (prefill vs decode rounding flips near-tied argmaxes; measured at k = 10, 30, 35, 60),
# while bf16 reruns of the same request are identical. In fp32 every continuation was
# identical; it costs ~25% tok/s here.
DTYPE = "float32"
MAX_MODEL_LEN = 2048
START_TIMEOUT = 420.0  # a loaded 2-core machine: vLLM start-up took 25-80 s here
# The worker sets these itself; the reference server gets the same.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "OMP_NUM_THREADS": "1"}


def model_folder() -> tuple[str, float]:
    """Build (or find) the model folder in a subprocess (torch stays out of pytest):
    (folder, seconds it took)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(BUILD_MODEL)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise AssertionError(f"model folder build failed ({done.returncode}): {done.stderr[-2000:]}")
    folder = done.stdout.strip().splitlines()[-1]
    assert Path(folder, "config.json").is_file()
    return folder, time.monotonic() - started


async def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until ``url`` answers 200; fails with the log's tail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vLLM server exited ({proc.returncode}); log:\n{log.read_text()[-4000:]}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM server not up after {timeout}s; log:\n{log.read_text()[-4000:]}")
            await asyncio.sleep(0.25)


class VllmOpenAIServer:
    """vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``) on
    ``model``, float32, prefix caching on, with ``args`` added; stopped on exit.

        async with VllmOpenAIServer(tmp, model, "--enable-auto-tool-choice") as server:
            ... server.url ...
    """

    def __init__(self, log_dir: Path, model: str, *args: str) -> None:
        self.port = free_port()
        self.log = log_dir / "vllm-server.log"
        self.argv = ["-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
                     "--port", str(self.port), "--dtype", DTYPE, "--max-model-len", str(MAX_MODEL_LEN),
                     "--enforce-eager", "--enable-prefix-caching", "--disable-uvicorn-access-log", *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> VllmOpenAIServer:
        started = time.monotonic()
        self.proc = spawn_python(self.argv, self.log, env={k: os.environ.get(k, v) for k, v in CPU_ENV.items()})
        try:
            await wait_http(f"{self.url}/health", self.proc, self.log, START_TIMEOUT)
        except BaseException:
            await self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self.proc is not None:
            await asyncio.to_thread(stop_process, self.proc, 30)
