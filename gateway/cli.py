"""The `vna` command: serve, migrate, and the Application Entity table.

    vna serve [--data-dir D] [--dicom-port 11112] [--http-port 8080] [--ae-title VNA] [--database-url URL]
    vna migrate
    vna ae add NAME HOST PORT | vna ae list | vna ae remove NAME
    vna policy check [--policy FILE]      storage classes against the live cluster, in plain words
    vna policy apply [--limit N] [--rate MBPS] [--grace S]   move instances to the class the policy wants
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from archive.config import Settings, StorageBackend, validate_ae_title
from archive.errors import ConfigError, VnaError
from archive.index import ApplicationEntity
from archive.moves import Mover
from archive.policy import Policy, load_policy
from archive.policy_check import check_against_cluster, check_offline
from archive.stores import open_stores
from metrics.registry import Metrics
from gateway.process import configure_process, run_loop, settle_gc
from gateway.runtime import Runtime, open_index
from gateway.workers import serve_with_workers, worker_count

log = logging.getLogger("vna")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="YAML or TOML settings file")
    common.add_argument("--data-dir", type=Path, help="where the embedded database, objects and ports.json live")
    common.add_argument("--database-url", help="PostgreSQL URL (default: an embedded server under --data-dir)")
    common.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")

    p = argparse.ArgumentParser(prog="vna", description="DICOM gateway and archive")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common], help="run the DIMSE and HTTP servers")
    serve.add_argument("--dicom-port", type=int, help="DIMSE port (0: pick a free one)")
    serve.add_argument("--http-port", type=int, help="HTTP port (0: pick a free one)")
    serve.add_argument("--ae-title", help="our AE title (called AE title peers must use)")
    sub.add_parser("migrate", parents=[common], help="apply database migrations and exit")
    ae = sub.add_parser("ae", help="Application Entities we send to (C-MOVE destinations)")
    ae_sub = ae.add_subparsers(dest="ae_command", required=True)
    add = ae_sub.add_parser("add", parents=[common], help="add or update a destination")
    add.add_argument("name")
    add.add_argument("host")
    add.add_argument("port", type=int)
    ae_sub.add_parser("list", parents=[common], help="list destinations")
    rm = ae_sub.add_parser("remove", parents=[common], help="remove a destination")
    rm.add_argument("name")
    pol = sub.add_parser("policy", help="storage policies (storage.policy_file): check, apply")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True)
    chk = pol_sub.add_parser("check", parents=[common],
                             help="validate the policy file against the cluster and say what each class does")
    chk.add_argument("--policy", type=Path, help="the policy file (default: storage.policy_file)")
    app = pol_sub.add_parser("apply", parents=[common],
                             help="move instances whose class differs from what the rules and lifecycle want")
    app.add_argument("--policy", type=Path, help="the policy file (default: storage.policy_file)")
    app.add_argument("--limit", type=int, help="move at most this many instances (pending ones included)")
    app.add_argument("--rate", type=float, help="throttle copies to this many MB/s (default storage.moves.rate_mb_per_s)")
    app.add_argument("--grace", type=float,
                     help="seconds between the switch and deleting the old copy (default storage.moves.grace_seconds)")
    app.add_argument("--concurrency", type=int, help="objects copied at once (default storage.moves.concurrency)")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.data_dir is not None:
        out["data_dir"] = args.data_dir
    if args.log_level:
        out["log_level"] = args.log_level
    if args.database_url:
        out["database"] = {"url": args.database_url}
    if getattr(args, "dicom_port", None) is not None:
        out["dicom"] = {"port": args.dicom_port}
    if getattr(args, "http_port", None) is not None:
        out["http"] = {"port": args.http_port}
    if getattr(args, "ae_title", None):
        out["ae_title"] = args.ae_title
    return out


async def _serve(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    async with Runtime(settings) as runtime:
        settle_gc()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runtime.request_stop)
        loop.add_signal_handler(signal.SIGHUP, runtime.request_policy_reload)
        await runtime.wait_for_stop()
        log.info("stopping: draining associations and requests")


async def _ae(settings: Settings, args: argparse.Namespace) -> None:
    async with open_index(settings) as index:
        if args.ae_command == "add":
            try:
                title = validate_ae_title(args.name)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            await index.ae_add(ApplicationEntity(title, args.host, args.port), timeout=30)
            print(f"{title} -> {args.host}:{args.port}")
        elif args.ae_command == "remove":
            if not await index.ae_remove(args.name, timeout=30):
                raise ConfigError(f"no Application Entity {args.name!r}")
        else:
            for ae in await index.ae_list(timeout=30):
                print(f"{ae.ae_title:16} {ae.host}:{ae.port}")


def _policy_of(settings: Settings, args: argparse.Namespace) -> Policy:
    path = args.policy or settings.storage.policy_file
    if path is None:
        raise ConfigError("no policy file: give --policy FILE or set storage.policy_file")
    return load_policy(path)


async def _policy(settings: Settings, args: argparse.Namespace) -> int:
    policy = _policy_of(settings, args)
    if args.policy_command == "check":
        if settings.storage.backend is not StorageBackend.rados:
            check = check_offline(policy, str(settings.object_root))
        else:
            from archive.rados_store import RadosConnection
            connection = RadosConnection(settings.storage.rados)
            try:
                await connection.connect()
                check = await check_against_cluster(policy, connection)
            finally:
                await connection.close()
        print(check.report())
        return 0 if check.ok else 1
    m = settings.storage.moves
    rate = args.rate if args.rate is not None else m.rate_mb_per_s
    async with open_index(settings) as index, open_stores(settings, policy) as stores:
        mover = Mover(index.pool, stores, Metrics(), grace_seconds=args.grace if args.grace is not None else
                      m.grace_seconds, rate_bytes_per_s=rate * 1e6 or None,
                      concurrency=args.concurrency or m.concurrency, db_timeout=settings.database.command_timeout)
        report = await mover.run(limit=args.limit)
    print(report.summary())
    for error in report.errors:
        print(f"failed: {error}", file=sys.stderr)
    return 1 if report.failed else 0


async def _migrate(settings: Settings) -> None:
    async with open_index(settings):
        print("database is up to date")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load(_overrides(args), args.config)
    except ConfigError as exc:
        print(f"vna: {exc}", file=sys.stderr)
        return 2
    configure_process(settings)
    try:
        if args.command == "serve":
            count = worker_count(settings)
            run_loop(settings, serve_with_workers(settings, count) if count > 1 else _serve(settings))
        elif args.command == "migrate":
            run_loop(settings, _migrate(settings))
        elif args.command == "policy":
            return run_loop(settings, _policy(settings, args))
        else:
            run_loop(settings, _ae(settings, args))
    except ConfigError as exc:
        print(f"vna: {exc}", file=sys.stderr)
        return 2
    except VnaError as exc:
        print(f"vna: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
