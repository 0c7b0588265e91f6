"""The ``rayloop`` command: ``rayloop up`` runs a hub, ``rayloop state`` shows live actor state."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys


def _up(args: argparse.Namespace) -> int:
    import uvloop

    from cluster.config import HubConfig
    from cluster.hub import Hub

    overrides = {}
    if args.shards is not None:
        overrides["shard_count"] = args.shards
    if args.admin_port is not None:
        overrides["admin_port"] = args.admin_port
    if args.shard_host is not None:
        overrides["shard_host"] = args.shard_host
    config = HubConfig.from_env(**overrides)

    async def run() -> None:
        hub = Hub(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await hub.start()
            print(f"rayloop hub is up: FSPIOP API http://{config.fspiop_host}:{hub.fspiop_port}, "
                  f"admin API http://{config.admin_host}:{hub.admin_port}, "
                  f"ops gRPC {config.ops_grpc_host}:{hub.ops_port}. Ctrl-C stops it.", flush=True)
            await stop.wait()
        finally:
            await hub.stop()

    uvloop.run(run())
    return 0


def _state(args: argparse.Namespace) -> int:
    import grpc

    from api.ops_grpc import query_state

    target = args.target or os.environ.get("RAYLOOP_OPS_GRPC_TARGET") or (
        f"{os.environ.get('RAYLOOP_OPS_GRPC_HOST', '127.0.0.1')}:{os.environ.get('RAYLOOP_OPS_GRPC_PORT', '50051')}"
    )
    try:
        if args.kind == "participant":
            reply = query_state(target, participant=args.name)
        elif args.kind == "shard":
            reply = query_state(target, shard=int(args.name))
        else:
            reply = query_state(target)
    except grpc.RpcError as error:
        print(f"rayloop state: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayloop", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a hub (embedded Postgres unless RAYLOOP_DATABASE_URL is set)")
    up.add_argument("--shards", type=int, help="number of position shards (RAYLOOP_SHARDS)")
    up.add_argument("--shard-host", choices=["ingress", "actors"],
                    help="shards inside the ingress workers (default) or actors of their own (RAYLOOP_SHARD_HOST)")
    up.add_argument("--admin-port", type=int, help="admin API port (RAYLOOP_ADMIN_PORT, default 3001)")
    up.set_defaults(run=_up)
    state = commands.add_parser("state", help="live actor state from a running hub's ops gRPC service")
    state.add_argument("kind", choices=["participant", "shard", "shards"], nargs="?", default="shards")
    state.add_argument("name", nargs="?", help="participant name or shard number")
    state.add_argument("--target", help="ops gRPC host:port (default RAYLOOP_OPS_GRPC_HOST:PORT, 127.0.0.1:50051)")
    state.set_defaults(run=_state)
    args = parser.parse_args(argv)
    if getattr(args, "kind", None) in ("participant", "shard") and not args.name:
        parser.error(f"rayloop state {args.kind} needs a name")
    logging.basicConfig(level=os.environ.get("RAYLOOP_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
