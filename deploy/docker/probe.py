#!/usr/bin/env python3
"""Container health probe (the images have no curl).

    dynrt-probe http://127.0.0.1:8000/live     exit 0 on HTTP 200, 1 otherwise
    dynrt-probe controller                      exit 0 if etcd answers and an active
                                                controller holds the namespace's leader key

``controller`` reads the usual DYNRT_* settings (endpoints, TLS, user/password) so it
sees etcd exactly as the controller does.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request


def probe_http(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"dynrt-probe: {url}: {exc}", file=sys.stderr)
        return 1


def probe_controller() -> int:
    import asyncio

    from dynrt.runtime.config import ControllerConfig, from_args
    from dynrt.runtime.discovery import EtcdClient
    from dynrt.controller.records import leader_key

    async def check() -> int:
        config = from_args(ControllerConfig)
        etcd = EtcdClient.from_config(config)
        try:
            leader = await etcd.get(leader_key(config.namespace))
        finally:
            await etcd.close()
        if leader is None:
            print("dynrt-probe: no active controller", file=sys.stderr)
            return 1
        return 0

    try:
        return asyncio.run(asyncio.wait_for(check(), 8))
    except Exception as exc:  # etcd down, bad settings: unhealthy either way
        print(f"dynrt-probe: controller: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    target = sys.argv[1]
    return probe_controller() if target == "controller" else probe_http(target)


if __name__ == "__main__":
    sys.exit(main())
