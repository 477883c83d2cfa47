"""How a benchmark deployment's frontend runs: which source tree's code, and how it
chunks its SSE stream (``benchmarks/serve.py --baseline-tree`` and ``--chunking``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dynrt.frontend.attempt_reader import ONE_TOKEN_PER_CHUNK_ENV

# The source tree's folders and the ``dynrt`` subpackages they are installed as (pyproject.toml).
_SUBPACKAGES = ("runtime", "frontend", "worker", "router", "controller")
CHUNKING_MODES = ("coalesced", "one")


def package_layout(tree: Path) -> Path:
    """A temporary folder in which ``import dynrt`` finds ``tree``'s code: ``dynrt/`` holds
    links to ``tree/dynrt/*`` and, as its subpackages, to ``tree/runtime`` etc. A process
    started with it as its working directory (``python -m dynrt.cli`` puts that first on
    ``sys.path``) runs that tree, not the installed one."""
    tree = tree.resolve()
    layout = Path(tempfile.mkdtemp(prefix="dynrt-tree-"))
    package = layout / "dynrt"
    package.mkdir()
    for entry in (tree / "dynrt").iterdir():
        (package / entry.name).symlink_to(entry)
    for name in _SUBPACKAGES:
        (package / name).symlink_to(tree / name, target_is_directory=True)
    probe = subprocess.run([sys.executable, "-c", "import dynrt.frontend.migration as m; print(m.__file__)"],
                           cwd=layout, capture_output=True, text=True, check=True)
    found = Path(probe.stdout.strip()).resolve()
    if not found.is_relative_to(tree):
        raise RuntimeError(f"the package layout for {tree} imports {found}")
    return layout


@contextlib.contextmanager
def frontend_setup(chunking: str, layout: Path | None) -> Iterator[None]:
    """Processes started inside run with ``chunking`` (``one``: one token per SSE chunk)
    and, with a ``layout``, the code of its tree (their working directory)."""
    if chunking not in CHUNKING_MODES:
        raise ValueError(f"unknown chunking {chunking!r} (one of {', '.join(CHUNKING_MODES)})")
    saved_env, saved_cwd = os.environ.get(ONE_TOKEN_PER_CHUNK_ENV), os.getcwd()
    os.environ[ONE_TOKEN_PER_CHUNK_ENV] = "1" if chunking == "one" else "0"
    if layout is not None:
        os.chdir(layout)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        if saved_env is None:
            os.environ.pop(ONE_TOKEN_PER_CHUNK_ENV, None)
        else:
            os.environ[ONE_TOKEN_PER_CHUNK_ENV] = saved_env
