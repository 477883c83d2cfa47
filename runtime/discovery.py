"""etcd discovery on aetcd: leases that survive etcd outages, and prefix watches that
never miss or duplicate an event.

- ``EtcdClient``: one aetcd client over a list of endpoints. aetcd talks to a single
  host:port, so failover across cluster members is done here: on a connection error the
  next endpoint is tried (what etcd's own clients do).
- ``LeasedRegistration``: grants a lease, keeps it alive, puts keys under it. **An etcd
  outage never kills the process** (Dynamo #3493 restarts everything on an etcd blip): the
  keep-alive loop keeps retrying; when etcd answers again, the lease is refreshed if it
  survived, or a new one is granted and every registered key is put again.
- ``PrefixWatcher``: keeps a view of every key under a prefix. It gets the prefix, then
  watches from that get's revision + 1, so no event is missed or seen twice. When the watch
  breaks (etcd down, member gone, compaction) it gets the prefix again, reports the
  difference against its view as puts/deletes, and watches on. While etcd is down the
  last view stays in force.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc

from dynrt.runtime.lifecycle import cancel_and_wait
from dynrt.runtime.log import get_logger

if TYPE_CHECKING:
    from dynrt.runtime.config import CommonConfig

log = get_logger("discovery")

T = TypeVar("T")

# What a failed etcd call raises: aetcd's mapped errors, gRPC's own, and our timeouts.
ETCD_ERRORS: tuple[type[BaseException], ...] = (
    aetcd.exceptions.ClientError,
    asyncio.TimeoutError,
    OSError,
    aetcd.rpc.AioRpcError,
)

# gRPC's default reconnect backoff grows to 120 s: after an etcd restart we want to be
# back within a second, not minutes.
_GRPC_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 3_000,
}


def closed_under_us() -> bool:
    """True when a ``CancelledError`` just caught did not come from cancelling this
    task. gRPC aio raises ``CancelledError`` in every call still in flight on a channel
    that is closed, and ``EtcdClient`` closes a client's channel when any task that
    shares it rotates to a fresh one: for the other tasks that is a broken connection,
    to be retried, not an order to stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class EtcdUnavailable(Exception):
    """No etcd endpoint answered."""


class _TlsClient(aetcd.Client):
    """``aetcd.Client`` over a TLS channel: aetcd's own ``connect`` only ever opens an
    insecure one. The same steps as ``aetcd.Client.connect`` otherwise (authenticate if
    a user is set, then the stubs and the watcher)."""

    def __init__(self, *, credentials: grpc.ChannelCredentials, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is connecting: wait for it
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            self.channel = aetcd.rpc.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                                    options=self._options.items())
            if self._username is not None and self._password is not None:
                self.auth_stub = aetcd.rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password),
                    timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(aetcd.rpc.WatchStub(self.channel), timeout=self._timeout,
                                                  metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"etcd TLS: cannot read {what} {path!r}: {exc.strerror}") from None


class EtcdClient:
    def __init__(self, endpoints: str | list[str], *, user: str = "", password: str = "",
                 timeout: float = 2.0, ca: str = "", cert: str = "", key: str = "") -> None:
        """``ca``/``cert``/``key``: PEM files. ``ca`` (or an ``https://`` endpoint) turns
        on TLS; ``cert`` + ``key`` add a client certificate (etcd ``--client-cert-auth``).
        Unreadable files or a cert without its key fail here, at start-up."""
        if isinstance(endpoints, str):
            endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise ValueError("no etcd endpoints")
        tls = bool(ca or cert) or any(e.startswith("https://") for e in endpoints)
        self.endpoints = [e.removeprefix("http://").removeprefix("https://") for e in endpoints]
        self._user = user or None
        self._password = password or None
        self.timeout = timeout
        self._index = 0
        self._client: aetcd.Client | None = None
        self._lock = asyncio.Lock()
        self._credentials: grpc.ChannelCredentials | None = None
        if bool(cert) != bool(key):
            raise ValueError("etcd TLS: --etcd-cert and --etcd-key go together")
        if tls:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(ca, "CA file") if ca else None,  # None: system roots
                private_key=_read_pem(key, "key file") if key else None,
                certificate_chain=_read_pem(cert, "certificate file") if cert else None)

    @classmethod
    def from_config(cls, config: "CommonConfig") -> "EtcdClient":
        """The client every component builds from its ``--etcd-*`` settings."""
        return cls(config.etcd_endpoints, user=config.etcd_user, password=config.etcd_password,
                   ca=config.etcd_ca, cert=config.etcd_cert, key=config.etcd_key)

    @property
    def tls(self) -> bool:
        return self._credentials is not None

    def _new_client(self) -> aetcd.Client:
        host, _, port = self.endpoints[self._index].rpartition(":")
        # aetcd's per-call timeout is an int in its annotations but is passed to gRPC,
        # which takes seconds as a float.
        kwargs = dict(host=host, port=int(port), username=self._user, password=self._password,
                      timeout=self.timeout, options=_GRPC_OPTIONS)
        if self._credentials is not None:
            return _TlsClient(credentials=self._credentials, **kwargs)
        return aetcd.Client(**kwargs)  # type: ignore[arg-type]

    async def client(self) -> aetcd.Client:
        if self._client is None:
            self._client = self._new_client()
        return self._client

    async def rotate(self, failed: aetcd.Client) -> None:
        """Replace ``failed`` (the client a call or watch broke on) with a fresh client
        on the next endpoint, and close it; a no-op if another task already did."""
        async with self._lock:
            if self._client is not failed:
                return  # another task rotated already
            self._index = (self._index + 1) % len(self.endpoints)
            self._client = self._new_client()
        try:
            await asyncio.wait_for(failed.close(), 1.0)
        except Exception:  # closing a broken channel may fail in many ways; it is gone anyway
            pass

    async def call(self, operation: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run ``operation`` against the current endpoint; on a connection failure
        try each other endpoint once. Raises ``EtcdUnavailable`` if none answers."""
        last_error: BaseException | None = None
        # One more attempt than there are endpoints: a call whose client another task
        # rotated away (and closed) mid-call is retried once on the new client.
        for _ in range(len(self.endpoints) + 1):
            client = await self.client()
            try:
                return await asyncio.wait_for(operation(client), self.timeout + 0.5)
            except aetcd.exceptions.PreconditionFailedError:
                raise
            except asyncio.CancelledError:
                if not closed_under_us():
                    raise
                last_error = EtcdUnavailable("etcd client closed by another task mid-call")
                continue
            except ETCD_ERRORS as exc:
                last_error = exc
                # A fresh client re-authenticates (an expired etcd auth token fails every
                # call on the old one) and, with several members, moves to the next.
                await self.rotate(client)
        raise EtcdUnavailable(str(last_error))

    async def get_prefix(self, prefix: str) -> tuple[int, dict[str, bytes]]:
        """(revision, {key: value}) for every key under ``prefix``."""
        result = await self.call(lambda c: c.get_prefix(prefix.encode()))
        if result is None:
            raise EtcdUnavailable("get_prefix returned nothing")
        return result.header.revision, {kv.key.decode(): kv.value for kv in result}

    async def get(self, key: str) -> bytes | None:
        result = await self.call(lambda c: c.get(key.encode()))
        return None if result is None else result.value

    async def put(self, key: str, value: bytes, lease: int | None = None) -> None:
        await self.call(lambda c: c.put(key.encode(), value, lease=lease))

    async def delete(self, key: str) -> None:
        await self.call(lambda c: c.delete(key.encode()))

    async def close(self) -> None:
        if self._client is not None:
            try:
                await asyncio.wait_for(self._client.close(), 2.0)
            except Exception:  # best effort at shutdown
                pass
            self._client = None


class LeasedRegistration:
    """Keys that live as long as this process (and vanish ``ttl`` seconds after it dies)."""

    def __init__(self, etcd: EtcdClient, ttl: int = 10) -> None:
        self.etcd = etcd
        self.ttl = ttl
        self.lease_id: int | None = None
        self.keys: dict[str, bytes] = {}
        self.lease_grants = 0
        self.healthy = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._wake = asyncio.Event()

    async def start(self, wait: float | None = None) -> None:
        """Start the keep-alive loop. With ``wait``, block until the first lease is
        granted (raises ``EtcdUnavailable`` after ``wait`` seconds); without, register
        as soon as etcd answers."""
        self._task = asyncio.create_task(self._keepalive_loop(), name="etcd-lease-keepalive")
        if wait is not None:
            try:
                await asyncio.wait_for(self.healthy.wait(), wait)
            except asyncio.TimeoutError:
                raise EtcdUnavailable(f"no etcd lease within {wait}s ({','.join(self.etcd.endpoints)})") from None

    async def put(self, key: str, value: bytes) -> None:
        """Register ``key`` under the lease (kept, and re-put after a lease loss). If etcd
        is down now, it is put as soon as it is back."""
        self.keys[key] = value
        if self.lease_id is not None:
            try:
                await self.etcd.put(key, value, lease=self.lease_id)
                return
            except (EtcdUnavailable, *ETCD_ERRORS) as exc:
                log.warning("etcd_put_deferred", key=key, error=str(exc))
        self._wake.set()

    async def delete(self, key: str) -> None:
        self.keys.pop(key, None)
        try:
            await self.etcd.delete(key)
        except (EtcdUnavailable, *ETCD_ERRORS) as exc:
            log.warning("etcd_delete_failed", key=key, error=str(exc))

    async def _grant(self) -> None:
        lease = await self.etcd.call(lambda c: c.lease(self.ttl))
        old = self.lease_id
        self.lease_id = lease.id
        self.lease_grants += 1
        for key, value in list(self.keys.items()):
            await self.etcd.put(key, value, lease=lease.id)
        log.info("etcd_lease_granted", lease=hex(lease.id), ttl=self.ttl, keys=len(self.keys),
                 replaced=hex(old) if old else None)

    async def _refresh(self) -> bool:
        """True if the lease is alive after a keep-alive."""
        assert self.lease_id is not None
        lease_id = self.lease_id
        reply = await self.etcd.call(lambda c: c.refresh_lease(lease_id))
        return reply is not None and reply.TTL > 0

    async def _keepalive_loop(self) -> None:
        backoff = 0.1
        outage_since: float | None = None
        while not self._closed:
            try:
                if self.lease_id is None or not await self._refresh():
                    if self.lease_id is not None:
                        log.warning("etcd_lease_lost", lease=hex(self.lease_id))
                    await self._grant()
                elif outage_since is not None:
                    # The lease survived the outage; make sure every key is there.
                    for key, value in list(self.keys.items()):
                        await self.etcd.put(key, value, lease=self.lease_id)
                if outage_since is not None:
                    log.info("etcd_recovered", outage_seconds=round(time.monotonic() - outage_since, 2))
                    outage_since = None
                self.healthy.set()
                backoff = 0.1
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.5, self.ttl / 3))
                    # woken by a put made while etcd was away: put pending keys now
                    if self.lease_id is not None:
                        for key, value in list(self.keys.items()):
                            await self.etcd.put(key, value, lease=self.lease_id)
                except asyncio.TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd unreachable: keep serving, keep trying
                if outage_since is None:
                    outage_since = time.monotonic()
                    log.warning("etcd_unreachable", error=f"{type(exc).__name__}: {exc}")
                self.healthy.clear()
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 1.0)

    async def close(self, revoke: bool = True) -> None:
        """Stop keeping the lease alive; with ``revoke``, delete every key now."""
        self._closed = True
        await cancel_and_wait(self._task)
        if revoke and self.lease_id is not None:
            lease_id = self.lease_id
            try:
                await self.etcd.call(lambda c: c.revoke_lease(lease_id))
            except (EtcdUnavailable, *ETCD_ERRORS) as exc:
                log.warning("etcd_revoke_failed", error=str(exc))
        self.lease_id = None


PutCallback = Callable[[str, bytes], None]
DeleteCallback = Callable[[str], None]


class PrefixWatcher:
    """Calls ``on_put(key, value)`` / ``on_delete(key)`` for every change under
    ``prefix``, starting with every key present at start."""

    def __init__(self, etcd: EtcdClient, prefix: str, on_put: PutCallback, on_delete: DeleteCallback) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.on_put = on_put
        self.on_delete = on_delete
        self.view: dict[str, bytes] = {}
        self.synced = asyncio.Event()
        self.resyncs = 0
        self._task: asyncio.Task[None] | None = None
        self._client: aetcd.Client | None = None  # the client the current watch runs on
        self._watching = False  # the current attempt got as far as an open watch
        self._closed = False

    async def start(self, wait: float | None = None) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"etcd-watch:{self.prefix}")
        if wait is not None:
            try:
                await asyncio.wait_for(self.synced.wait(), wait)
            except asyncio.TimeoutError:
                raise EtcdUnavailable(f"could not read {self.prefix} from etcd within {wait}s") from None

    async def _sync(self) -> int:
        revision, current = await self.etcd.get_prefix(self.prefix)
        for key in [k for k in self.view if k not in current]:
            del self.view[key]
            self._emit_delete(key)
        for key, value in current.items():
            if self.view.get(key) != value:
                self.view[key] = value
                self._emit_put(key, value)
        self.resyncs += 1
        self.synced.set()
        return revision

    def _emit_put(self, key: str, value: bytes) -> None:
        try:
            self.on_put(key, value)
        except Exception:
            log.exception("watch_callback_failed", key=key)

    def _emit_delete(self, key: str) -> None:
        try:
            self.on_delete(key)
        except Exception:
            log.exception("watch_callback_failed", key=key)

    async def _watch_once(self) -> None:
        """Sync, then apply watch events until the stream breaks (always raises)."""
        revision = await self._sync()
        client = self._client = await self.etcd.client()
        watch = await asyncio.wait_for(
            client.watch_prefix(self.prefix.encode(), start_revision=revision + 1), self.etcd.timeout + 1)
        self._watching = True
        try:
            async for event in watch:
                key = event.kv.key.decode()
                if event.kind == "PUT":
                    if self.view.get(key) != event.kv.value:
                        self.view[key] = event.kv.value
                        self._emit_put(key, event.kv.value)
                elif key in self.view:
                    del self.view[key]
                    self._emit_delete(key)
        except asyncio.CancelledError:
            if not closed_under_us():
                try:
                    await asyncio.wait_for(watch.cancel(), 1.0)
                except Exception:  # the stream may already be dead
                    pass
            raise
        raise EtcdUnavailable("watch ended")

    async def _loop(self) -> None:
        backoff = 0.1
        # Checked as well as cancellation: Python 3.11's wait_for can swallow a cancel
        # that lands as the call it wraps completes (fixed in 3.12).
        while not self._closed:
            self._watching = False
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                if not closed_under_us():
                    raise
                error = "EtcdUnavailable: etcd client closed by another task"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            if self._watching:  # it was up: this is the first failure of a new outage
                backoff = 0.1
            if backoff == 0.1:  # first failure of an outage: one line, not one per retry
                log.warning("etcd_watch_broken", prefix=self.prefix, error=error)
            if self._client is not None:
                # Move off the client this watch used (a no-op if another task already did).
                await self.etcd.rotate(self._client)
                self._client = None
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 1.0)

    async def close(self) -> None:
        self._closed = True
        await cancel_and_wait(self._task)
