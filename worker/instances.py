"""``dynrt worker --engine mock --instances K``: K mock worker instances in one process,
for scale simulations (``benchmarks/scale.py``).

Each instance is a whole ``WorkerService`` — its own instance id, etcd lease and
instance record, frontend watch, NATS subjects (generate, control, reattach), load
reports with their heartbeat, KV events and health server — so etcd and NATS carry
exactly what K single-instance processes would send. What the instances share is the
process's one etcd client (one gRPC channel) and one NATS connection: a thousand
instances on two cores would otherwise spend their CPU on a thousand connections' read
loops and pings. That changes the connection count, not etcd's lease and keep-alive load
nor the NATS message load.

SIGTERM/SIGINT stop every instance (each drains and revokes its own lease); the exit
code is the highest of the instances'. An instance that turns unhealthy stops alone.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import msgspec

from dynrt.runtime.config import WorkerConfig
from dynrt.runtime.discovery import EtcdClient
from dynrt.runtime.log import get_logger
from dynrt.runtime.transport import NatsTransport
from dynrt.worker.engine import Engine
from dynrt.worker.service import WorkerService

log = get_logger("worker")

EngineFactory = Callable[[WorkerConfig], Engine]

# Instances started at once: each grants a lease and puts two records; starting a
# hundred at the same instant only queues those calls behind each other.
START_CONCURRENCY = 20
# Seconds the shared NATS connection has to close at exit.
RELEASE_TIMEOUT = 10.0


def instance_config(config: WorkerConfig, index: int) -> WorkerConfig:
    """Instance ``index``'s settings: a fixed ``--system-port`` P becomes P + index (each
    instance has its own health server); 0 stays 0 (a free port each)."""
    port = config.system_port + index if config.system_port else 0
    return msgspec.structs.replace(config, system_port=port, instances=1)


async def run_instances(config: WorkerConfig, make_engine: EngineFactory) -> int:
    """Run ``config.instances`` instances until a signal; the highest exit code."""
    etcd = EtcdClient.from_config(config)
    transport = await NatsTransport.connect(
        config.nats_url, name=f"worker-x{config.instances}", heartbeat_interval=config.heartbeat_interval,
        creds_file=config.nats_creds)
    services = [WorkerService(instance_config(config, i), make_engine(config), etcd=etcd, transport=transport,
                              handle_signals=False) for i in range(config.instances)]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: [svc.shutdown.request(s.name) for svc in services])
    gate = asyncio.Semaphore(START_CONCURRENCY)

    async def run_one(service: WorkerService) -> int:
        async with gate:  # released once started: a started instance's run() only waits for its stop
            started = asyncio.create_task(service.run())
            while service.state in ("starting", "loading") and not started.done():
                await asyncio.sleep(0.01)
        return await started

    log.info("worker_instances_starting", instances=config.instances)
    try:
        codes = await asyncio.gather(*(run_one(s) for s in services))
    finally:
        # Bounded like a single worker's release step: with NATS gone a drain can wait forever.
        try:
            await asyncio.wait_for(transport.close(), RELEASE_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("nats_close_timed_out", timeout=RELEASE_TIMEOUT)
        await etcd.close()
    return max(codes, default=0)
