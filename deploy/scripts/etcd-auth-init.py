#!/usr/bin/env python3
"""Turn on etcd authentication for dynrt, idempotently (the ``etcd-auth`` job of
docker-compose.ha.yml; run it again at any time).

- user ``root`` (role root) with the password in ``ETCD_ROOT_PASSWORD_FILE``
- role ``dynrt``: read/write on the key prefix ``dynrt/`` only
- user ``DYNRT_ETCD_USER`` (default ``dynrt``) with that role, password in
  ``DYNRT_ETCD_PASSWORD_FILE``
- ``auth enable``

Connection settings are dynrt's own (``DYNRT_ETCD_ENDPOINTS``, ``DYNRT_ETCD_CA``,
``DYNRT_ETCD_CERT``, ``DYNRT_ETCD_KEY``). Once auth is on, it logs in as root.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aetcd
import aetcd.exceptions
import aetcd.rpc

from dynrt.runtime.config import CommonConfig, from_args
from dynrt.runtime.discovery import EtcdClient

PREFIX = b"dynrt/"


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _secret(env: str) -> str:
    path = os.environ.get(env, "")
    if not path:
        sys.exit(f"etcd-auth-init: set {env}")
    return Path(path).read_text().strip()


async def _auth_stub(etcd: EtcdClient) -> tuple[aetcd.Client, aetcd.rpc.AuthStub]:
    client = await etcd.client()
    await client.connect()
    return client, aetcd.rpc.AuthStub(client.channel)


async def _try(call, *ignore: str) -> None:  # type: ignore[no-untyped-def]
    try:
        await call
    except aetcd.rpc.AioRpcError as exc:
        if not any(text in (exc.details() or "") for text in ignore):
            raise


async def setup(config: CommonConfig, root_password: str, user: str, password: str) -> None:
    etcd = EtcdClient.from_config(CommonConfig(**{**_fields(config), "etcd_user": "", "etcd_password": ""}))
    client, auth = await _auth_stub(etcd)
    try:
        await auth.UserList(aetcd.rpc.AuthUserListRequest(), timeout=5)
        metadata = None  # auth is off: no token needed
    except aetcd.rpc.AioRpcError:
        await etcd.close()  # auth is on already: log in as root
        etcd = EtcdClient.from_config(CommonConfig(**{**_fields(config), "etcd_user": "root",
                                                      "etcd_password": root_password}))
        client, auth = await _auth_stub(etcd)
        metadata = client.metadata
    try:
        exists = ("already exists",)
        await _try(auth.UserAdd(aetcd.rpc.AuthUserAddRequest(name="root", password=root_password),
                                metadata=metadata, timeout=5), *exists)
        await _try(auth.UserGrantRole(aetcd.rpc.AuthUserGrantRoleRequest(user="root", role="root"),
                                      metadata=metadata, timeout=5), "already")
        await _try(auth.RoleAdd(aetcd.rpc.AuthRoleAddRequest(name="dynrt"), metadata=metadata, timeout=5), *exists)
        perm = aetcd.rpc.Permission(permType=aetcd.rpc.Permission.READWRITE, key=PREFIX, range_end=_prefix_end(PREFIX))
        await auth.RoleGrantPermission(aetcd.rpc.AuthRoleGrantPermissionRequest(name="dynrt", perm=perm),
                                       metadata=metadata, timeout=5)
        try:
            await auth.UserAdd(aetcd.rpc.AuthUserAddRequest(name=user, password=password), metadata=metadata, timeout=5)
        except aetcd.rpc.AioRpcError as exc:
            if "already exists" not in (exc.details() or ""):
                raise
            await auth.UserChangePassword(aetcd.rpc.AuthUserChangePasswordRequest(name=user, password=password),
                                          metadata=metadata, timeout=5)
        await _try(auth.UserGrantRole(aetcd.rpc.AuthUserGrantRoleRequest(user=user, role="dynrt"),
                                      metadata=metadata, timeout=5), "already")
        await auth.AuthEnable(aetcd.rpc.AuthEnableRequest(), metadata=metadata, timeout=5)
        print(f"etcd-auth-init: auth enabled; user {user!r} may read/write {PREFIX.decode()}*", flush=True)
    finally:
        await etcd.close()


def _fields(config: CommonConfig) -> dict[str, object]:
    import msgspec

    return msgspec.structs.asdict(config)


def main() -> None:
    config = from_args(CommonConfig)
    user = config.etcd_user or "dynrt"
    asyncio.run(setup(config, _secret("ETCD_ROOT_PASSWORD_FILE"), user, _secret("DYNRT_ETCD_PASSWORD_FILE")))


if __name__ == "__main__":
    main()
