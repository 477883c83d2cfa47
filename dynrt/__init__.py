"""dynrt: a fault-tolerant runtime for serving LLMs. This package holds only the
command line; the components are ``dynrt.runtime``, ``dynrt.worker``,
``dynrt.frontend`` and ``dynrt.router``."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dynrt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
