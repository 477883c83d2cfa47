"""HTTP reads of components that may be dead, stopped or not up yet."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp


async def get_json(session: aiohttp.ClientSession, url: str, timeout: float = 2.0) -> tuple[int, Any] | None:
    """(status, JSON body), or None when nothing answers (dead, stopped, not yet up)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status, await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None
