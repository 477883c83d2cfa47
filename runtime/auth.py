"""Who may call an HTTP endpoint: API keys, admin keys, and the rule that joins them.

Every route of a component's HTTP server has an :data:`Access` level:

* ``open``: anyone (``/health``, ``/live``, ``/metrics``, ``/version``, ``GET
  /busy_threshold``): probes and scrapers carry no key, and these change nothing.
* ``api``: an API key when any is configured (``/v1/*``, ``/tokenize``,
  ``/detokenize``); open when none is (a development deployment).
* ``admin``: endpoints that change state for everyone (``POST /busy_threshold``). They
  take an admin key when one is configured, and then *only* an admin key; with no admin
  key they take the API keys; with no key of either kind they are open. So they are
  never open while any key is configured.

A key is sent as ``Authorization: Bearer KEY`` (scheme case-insensitive, RFC 7235).
Keys are compared in constant time: both sides are hashed (SHA-256, so lengths are
equal and a key's length does not leak through timing) and the presented key is
compared with *every* configured key with ``hmac.compare_digest``, without stopping at
the first match, so the time does not say which key (or whether any) matched.

Pure logic: the HTTP servers (``frontend/server.py``, ``router/http.py``) ask
:meth:`Authenticator.check` and turn a :class:`Rejection` into a 401.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from dynrt.runtime.config import AuthConfig

Access = Literal["open", "api", "admin"]
Rejection = Literal["missing", "invalid"]  # no bearer key / a key not accepted here


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeySet:
    """Accepted keys, kept only as SHA-256 digests."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = [_digest(k) for k in dict.fromkeys(keys)]

    def __len__(self) -> int:
        return len(self._digests)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        presented = _digest(key)
        found = False
        for digest in self._digests:  # every key, no early exit
            found |= hmac.compare_digest(presented, digest)
        return found


def read_key_file(path: str) -> list[str]:
    """The keys in ``path``: one per line; blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"dynrt: cannot read key file {path}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _keys(inline: Iterable[str], file: str, setting: str) -> list[str]:
    keys = [k.strip() for k in inline] + (read_key_file(file) if file else [])
    for key in keys:
        if not key:
            raise SystemExit(f"dynrt: invalid setting: an empty key in --{setting}")
        if any(c.isspace() for c in key):
            raise SystemExit(f"dynrt: invalid setting: a key in --{setting} contains white space")
    return keys


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header; None if there is none."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


class Authenticator:
    """Decides whether a request's ``Authorization`` header may reach a route."""

    def __init__(self, api_keys: Iterable[str] = (), admin_keys: Iterable[str] = ()) -> None:
        self.api_keys = KeySet(api_keys)
        self.admin_keys = KeySet(admin_keys)

    @classmethod
    def from_config(cls, config: AuthConfig) -> Authenticator:
        """Keys from flags, environment and files; exits with a message if a file is
        unreadable or a key is empty."""
        return cls(_keys(config.api_key, config.api_key_file, "api-key"),
                   _keys(config.admin_api_key, config.admin_api_key_file, "admin-api-key"))

    def keys_for(self, access: Access) -> KeySet | None:
        """The keys a route of this access level takes; None: it is open."""
        if access == "open":
            return None
        if access == "admin" and self.admin_keys:
            return self.admin_keys
        return self.api_keys if self.api_keys else None

    def check(self, access: Access, authorization: str | None) -> Rejection | None:
        """None if the request may go on, else why not."""
        keys = self.keys_for(access)
        if keys is None:
            return None
        key = bearer_key(authorization)
        if key is None:
            return "missing"
        return None if key in keys else "invalid"

    def describe(self) -> dict[str, object]:
        """For the start-up log line: how many keys, and who may change state."""
        admin = ("admin keys" if self.admin_keys else "API keys" if self.api_keys
                 else "anyone (no key configured)")
        return {"api_keys": len(self.api_keys), "admin_keys": len(self.admin_keys), "state_changes_by": admin}
