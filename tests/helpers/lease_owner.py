"""A process that registers one key under an etcd lease and lives until killed:
the subject of the lease tests (SIGKILL it, stop etcd under it)."""

from __future__ import annotations

import asyncio
import sys

from dynrt.runtime.discovery import EtcdClient, LeasedRegistration
from dynrt.runtime.log import setup_logging


async def main(endpoint: str, key: str, ttl: int) -> None:
    registration = LeasedRegistration(EtcdClient(endpoint), ttl=ttl)
    await registration.start(wait=10)
    await registration.put(key, b"alive")
    print(f"registered {registration.lease_id}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    setup_logging("lease_owner")
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
