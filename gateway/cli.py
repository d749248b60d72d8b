"""The `vna` command: serve, migrate, and the Application Entity table.

    vna serve [--data-dir D] [--dicom-port 11112] [--http-port 8080] [--ae-title VNA] [--database-url URL]
    vna migrate
    vna ae add NAME HOST PORT | vna ae list | vna ae remove NAME
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import pydicom.config

from archive.config import Settings, validate_ae_title
from archive.errors import ConfigError, VnaError
from archive.index import ApplicationEntity
from gateway.runtime import Runtime, open_index

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
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runtime.request_stop)
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
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # We store what we receive and never re-validate values on read (PS3.5 errors in the wild abound).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        if args.command == "serve":
            asyncio.run(_serve(settings))
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
        else:
            asyncio.run(_ae(settings, args))
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
