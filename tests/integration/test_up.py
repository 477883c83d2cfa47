"""``dynrt up`` run the way a new user runs it: the installed ``dynrt`` command, no state
directory given, output to a pipe; wait for the ready line, send the chat completion the
ready line suggests as raw HTTP (what ``curl`` sends), then Ctrl-C (SIGINT to the
process group) and check that nothing it started is left running.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dynrt.runtime.embedded import free_port
from dynrt.runtime.mock_tokenizer import mock_tokenizer

pytestmark = pytest.mark.timeout(90)

DYNRT = str(Path(sys.executable).parent / "dynrt")


class Output:
    """The process's stdout, line by line, read on a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line (from now on, or already read) matching ``pattern``."""
        for line in self.lines:
            if match := re.search(pattern, line):
                return match
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} after {timeout}s; output:\n"
                                     + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"dynrt up exited ({self.proc.poll()}) before {pattern!r}; output:\n"
                                     + "\n".join(self.lines))
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match

    def rest(self, timeout: float) -> list[str]:
        self._thread.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return self.lines
            if line is not None:
                self.lines.append(line)


def processes_matching(needles: list[str]) -> dict[int, str]:
    """Live processes whose command line contains any of ``needles``: {pid: cmdline}."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        if any(needle in cmdline for needle in needles):
            found[int(entry.name)] = cmdline
    return found


def kind(cmdline: str) -> str:
    if "dynrt.cli worker" in cmdline:
        return "worker"
    if "dynrt.cli frontend" in cmdline:
        return "frontend"
    if "dynrt.cli controller" in cmdline:
        return "controller"
    return Path(cmdline.split(" ", 1)[0]).name


def test_dynrt_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    # TMPDIR only keeps the deployment's temp state dir inside this test's tmp_path.
    proc = subprocess.Popen([DYNRT, "up", "--workers", "2", "--port", str(port), "--speedup", "inf", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)}, start_new_session=True)
    out = Output(proc)
    children: dict[int, str] = {}
    try:
        state_dir = out.wait_for(r"logs in (\S+)\)", 30).group(1)
        assert Path(state_dir).is_dir() and state_dir.startswith(str(tmp_path))
        at = out.wait_for(r"frontend at (http://127\.0\.0\.1:(\d+))/v1 +\(etcd (\S+), NATS (\S+)\)", 30)
        assert int(at.group(2)) == port
        etcd_endpoint, nats_url = at.group(3), at.group(4)
        ready = out.wait_for(r"ready in [0-9.]+s: (\d+) worker\(s\) serving 'mock-model'", 60)
        assert ready.group(1) == "2"
        # Progress while the workers started, each with where its log is.
        progress = [re.search(r"dynrt up: worker (\S+) \(pid \d+\) (?:starting|loading).*\(log: (\S+)\)", line)
                    for line in out.lines]
        logs_named = {m.group(1): m.group(2) for m in progress if m}
        assert len(logs_named) == 2, "\n".join(out.lines)
        assert all(path == f"{state_dir}/replicas/{name}.log" for name, path in logs_named.items()), logs_named
        suggestion = out.wait_for(r"curl (http://\S+) -H 'Content-Type: application/json' -d '(.+)'$", 1)

        # What the suggested curl command sends.
        url, payload = suggestion.group(1), suggestion.group(2)
        assert url == f"http://127.0.0.1:{port}/v1/chat/completions"
        request = json.loads(payload)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=payload.encode(),
                     headers={"Content-Type": "application/json", "Accept": "*/*", "User-Agent": "curl/8.5.0"})
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 200, body
        assert response.getheader("Content-Type", "").startswith("application/json")
        assert body["object"] == "chat.completion" and body["model"] == "mock-model"
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
        assert choice["finish_reason"] in ("stop", "length")
        prompt_tokens = len(mock_tokenizer().apply_chat_template(request["messages"]))
        assert body["usage"]["prompt_tokens"] == prompt_tokens
        assert body["usage"]["completion_tokens"] >= 1
        assert body["usage"]["total_tokens"] == prompt_tokens + body["usage"]["completion_tokens"]
        conn.request("GET", "/v1/models")
        models = json.loads(conn.getresponse().read())
        assert [m["id"] for m in models["data"]] == ["mock-model"]
        assert models["data"][0]["max_model_len"] == 8192  # the mock's context length, under vLLM's key
        conn.close()

        # Everything dynrt up started, found by what their command lines share.
        needles = [state_dir, etcd_endpoint, nats_url, f"--http-port {port}"]
        children = processes_matching(needles)
        assert sorted(kind(c) for c in children.values()) == ["controller", "etcd", "frontend", "nats-server", "worker", "worker"], \
            children
        # The mock is asked for explicitly (a worker's own default engine is vLLM).
        assert all("--engine mock" in c for c in children.values() if kind(c) == "worker"), children

        # Ctrl-C: the terminal sends SIGINT to the foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        start = time.monotonic()
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError("dynrt up still running 15 s after SIGINT; output:\n" + "\n".join(out.lines)) from None
        stopped_in = time.monotonic() - start
        lines = out.rest(5)
        assert code == 0, "\n".join(lines)
        assert lines[-1] == "dynrt up: stopped", "\n".join(lines)
        assert stopped_in < 15
        # ... in order, each child by its own graceful stop
        # (the workers are the controller's: their logs are in replicas/)
        logs = {name: (Path(state_dir) / f"{name}.log").read_text() for name in ("frontend", "controller")}
        logs.update({p.stem: p.read_text() for p in (Path(state_dir) / "replicas").glob("*.log")})
        assert "event=frontend_stopped" in logs["frontend"], logs["frontend"][-2000:]
        assert "event=controller_replicas_stopped replicas=2" in logs["controller"], logs["controller"][-2000:]
        assert len(logs) == 4, sorted(logs)
        for name in set(logs) - {"frontend", "controller"}:
            assert re.search(r"event=worker_stopped .*exit_code=0", logs[name]), logs[name][-2000:]
        left = processes_matching(needles)
        assert left == {}, f"left behind: {left}"
        assert all(not Path(f"/proc/{pid}").exists() for pid in children), children
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Never leave a child behind, even when the test failed: only the ones seen above.
        for pid, cmdline in children.items():
            if processes_matching([cmdline]).get(pid) == cmdline:
                os.kill(pid, signal.SIGKILL)
