"""Which frontend reads each request a worker serves, so the requests of a frontend
that went away (its etcd key vanished) can be found: pure bookkeeping. A reattached
request moves to the frontend that resumed it."""

from __future__ import annotations


class FrontendRequests:
    def __init__(self) -> None:
        self._frontend_of: dict[str, str] = {}
        self._by_frontend: dict[str, set[str]] = {}

    def track(self, request_id: str, frontend_id: str) -> None:
        """``request_id`` is read by ``frontend_id`` (moved there if it was tracked)."""
        self.untrack(request_id)
        self._frontend_of[request_id] = frontend_id
        self._by_frontend.setdefault(frontend_id, set()).add(request_id)

    def untrack(self, request_id: str) -> None:
        frontend_id = self._frontend_of.pop(request_id, None)
        if frontend_id is None:
            return
        requests = self._by_frontend[frontend_id]
        requests.discard(request_id)
        if not requests:
            del self._by_frontend[frontend_id]

    def pop_frontend(self, frontend_id: str) -> set[str]:
        """The requests of a frontend that went away, no longer tracked."""
        requests = self._by_frontend.pop(frontend_id, set())
        for request_id in requests:
            del self._frontend_of[request_id]
        return requests

    def __len__(self) -> int:
        return len(self._frontend_of)
