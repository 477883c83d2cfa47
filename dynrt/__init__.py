"""dynrt: a fault-tolerant runtime for serving LLMs. This package holds the command
line and the operator commands (``dynrt up``, ``dynrt status``); the components are
``dynrt.runtime``, ``dynrt.worker``, ``dynrt.frontend``, ``dynrt.router`` and
``dynrt.controller``."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dynrt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
