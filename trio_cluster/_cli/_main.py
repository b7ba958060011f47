"""The ``trio-cluster`` command line (also ``python -m trio_cluster``).

* ``demo``: a self-contained tour on memory storage (``--runners 3`` for a
  live cluster with a failover);
* ``run MODULE:ATTRIBUTE``: run one runner of a cluster (PostgreSQL storage,
  WebSocket transport) until SIGTERM/SIGINT, then shut down gracefully;
* ``migrate``: create or upgrade the PostgreSQL schema;
* ``status``: print runners, shard owners, epochs and backlog;
* ``check-messages MODULE:ATTRIBUTE``: before a deploy, check that the new
  code decodes every stored, unprocessed persisted message;
* ``dlq list|show|replay|purge``: the dead-lettered persisted requests
  (`._dlq`);
* ``events lag``: the event bus's subscriptions (`._events`);
* ``webhooks attempts|dead|replay``: webhook deliveries (`._webhooks`);
* ``workflows list|show|signal|interrupt|resume``: workflow executions
  (`._workflows`).

Policy comes from ``TRIO_CLUSTER_*`` environment variables (see
`ShardingConfig.from_env`); options on the command line win.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from functools import partial
from typing import Any, TypeVar

import trio

from ._dlq import add_dlq_parser
from ._events import add_events_parser
from ._webhooks import add_webhooks_parser
from ._workflows import add_workflows_parser

__all__ = ["main"]

log = logging.getLogger("trio_cluster.cli")


T = TypeVar("T")


def _demo(args: argparse.Namespace) -> int:
    # The tour crashes an entity on purpose: keep its traceback off the screen.
    logging.getLogger("trio_cluster").setLevel(logging.CRITICAL)
    if args.runners > 1:
        from ._demo_cluster import run_cluster_demo

        trio.run(run_cluster_demo, args.runners)
    else:
        from ._demo import run_demo

        trio.run(run_demo)
    return 0


def load_target(target: str) -> dict[str, Any]:
    """Import ``module:attribute``: a sequence of entity classes, or a
    mapping of `open_runner` keyword arguments (``entities``, ``singletons``,
    ``crons``, ``broadcasts``, ``converter``, ``tracer``, ``listeners``),
    plus ``webhooks`` (`trio_cluster.webhooks.Webhooks` parts the runner
    hosts and opens on its storage) and ``gateway`` (the
    `trio_cluster.gateway.Gateway` that ``--gateway`` serves).

    Raises:
        SystemExit: the target cannot be imported or has the wrong shape.
    """
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"cannot import {module_name!r}: {exc}") from None
    value = getattr(module, attribute or "ENTITIES", None)
    if value is None:
        raise SystemExit(f"{module_name} has no attribute {attribute or 'ENTITIES'!r}")
    if isinstance(value, Mapping):
        allowed = {
            "entities",
            "singletons",
            "crons",
            "broadcasts",
            "converter",
            "tracer",
            "listeners",
            "webhooks",
            "gateway",
        }
        unknown = set(value) - allowed
        if unknown:
            raise SystemExit(
                f"{target}: unknown keys {sorted(unknown)}; use {sorted(allowed)}"
            )
        from ..webhooks import Webhooks

        parts = value.get("webhooks", ())
        if not isinstance(parts, Sequence) or not all(
            isinstance(part, Webhooks) for part in parts
        ):
            raise SystemExit(f"{target}: 'webhooks' must be a list of Webhooks")
        return dict(value)
    if isinstance(value, Sequence):
        return {"entities": list(value)}
    raise SystemExit(
        f"{target} must be a list of entity classes or a mapping of runner options"
    )


def _config(args: argparse.Namespace) -> Any:
    from .._core._config import ShardingConfig
    from ._security import ENV_VARIABLES

    overrides: dict[str, Any] = {}
    if "TRIO_CLUSTER_FREEZE_GC_AT_START" not in os.environ:
        # This process is only a runner: shorter full collections.
        overrides["freeze_gc_at_start"] = True
    if getattr(args, "listen", None):
        overrides["runner_address"] = _advertised(args.listen, args.advertise)
    return ShardingConfig.from_env(os.environ, ignore=ENV_VARIABLES, **overrides)


def _advertised(listen: str, advertise: str | None) -> Any:
    """The address other runners dial: ``--advertise`` (``host`` or
    ``host:port``; the port defaults to ``--listen``'s), else ``--listen``.

    Raises:
        ConfigError: either is malformed.
    """
    from .._core._addresses import RunnerAddress

    where = _address("--listen", listen)
    if advertise is None:
        return where
    bare = advertise.strip("[]")
    with suppress(ValueError):
        if ipaddress.ip_address(bare).version == 6:
            return RunnerAddress(bare, where.port)  # an IPv6 host, no port
    if ":" not in advertise:
        return RunnerAddress(advertise, where.port)
    return _address("--advertise", advertise)


def _address(option: str, text: str) -> Any:
    """``host:port`` given to ``option``.

    Raises:
        ConfigError: it is not one.
    """
    from .._core._addresses import RunnerAddress
    from .._errors import ConfigError

    try:
        return RunnerAddress.parse(text)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def _operator_error(exc: BaseException) -> tuple[int, str] | None:
    """Exit status and one line for an error of the operator's making or of
    the environment (bad option or variable, database unreachable, port in
    use), found anywhere in ``exc`` (a group of the runner's tasks, too);
    None for anything else (a bug: its traceback is worth showing)."""
    from .._errors import ConfigError, PersistenceError, RunnerUnavailableError

    if isinstance(exc, BaseExceptionGroup):
        found = [_operator_error(inner) for inner in exc.exceptions]
        known = [item for item in found if item is not None]
        if known and len(known) == len(found):
            return max(known, key=lambda item: item[0])  # a ConfigError first
        return None
    if isinstance(exc, ConfigError):
        return 2, str(exc)
    if isinstance(exc, PersistenceError | RunnerUnavailableError | OSError):
        return 1, str(exc)
    return None


def _run(args: argparse.Namespace) -> int:
    from ..storage import PostgresStorage
    from ..transport import WebSocketTransport
    from ._security import transport_security

    try:
        options = load_target(args.target)
        gateway = _gateway(args, options.pop("gateway", None))
        if gateway is not None:
            from ..gateway import Session, Topic

            # A gateway with topics needs their sequencer entity hosted, one
            # with sessions the session entity (and, with users, the topics
            # of their directories).
            definition = gateway[0]
            users = definition.sessions and definition.user is not None
            needed = [
                *([Topic] if definition.topics is not None or users else []),
                *([Session] if definition.sessions else []),
            ]
            entities = list(options.get("entities", ()))
            options["entities"] = [
                *entities,
                *(cls for cls in needed if cls not in entities),
            ]
        config = _config(args)
        metrics = _address("--metrics", args.metrics) if args.metrics else None
        storage = PostgresStorage(args.dsn, table_prefix=args.prefix)
        security = transport_security(
            os.environ,
            secret_file=args.secret_file,
            allow_unauthenticated=args.allow_unauthenticated,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
            tls_mutual=args.tls_mutual,
        )
        transport = WebSocketTransport(
            listen_at=_address("--listen", args.listen) if args.advertise else None,
            **security,
        )
        trio.run(_serve, options, config, storage, transport, metrics, gateway)
    except Exception as exc:
        found = _operator_error(exc)
        if found is None:
            raise
        code, message = found
        print(f"trio-cluster run: {message}", file=sys.stderr)
        return code
    return 0


def _gateway(args: argparse.Namespace, gateway: Any) -> tuple[Any, Any] | None:
    """The gateway definition and the address ``--gateway`` serves it at,
    or None without ``--gateway``.

    Raises:
        ConfigError: ``--gateway`` without a ``gateway`` in the target (or
            the other way round), or a malformed address.
    """
    from .._errors import ConfigError
    from ..gateway import Gateway

    if gateway is not None and not isinstance(gateway, Gateway):
        raise ConfigError(
            f"{args.target}: 'gateway' must be a Gateway, got {gateway!r}"
        )
    if args.gateway is None:
        if gateway is not None:
            raise ConfigError(
                f"{args.target} defines a gateway: serve it with --gateway HOST:PORT"
            )
        return None
    if gateway is None:
        raise ConfigError(
            f"--gateway: {args.target} names no gateway; make it a mapping with"
            " 'gateway': trio_cluster.gateway.Gateway(...)"
        )
    return gateway, _address("--gateway", args.gateway)


async def _serve(
    options: dict[str, Any],
    config: Any,
    storage: Any,
    transport: Any,
    metrics: Any,
    gateway: tuple[Any, Any] | None = None,
) -> None:
    from .._operations._metrics import ExtraMetrics, serve_metrics
    from .._runner import open_runner
    from ..gateway import serve_gateway

    parts = list(options.pop("webhooks", ()))
    entities = list(options.pop("entities", ()))
    for part in parts:
        entities += [cls for cls in part.entities if cls not in entities]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with (
            open_runner(
                config=config,
                storage=storage,
                transport=transport,
                entities=entities,
                **options,
            ) as runner,
            AsyncExitStack() as stack,
            trio.open_nursery() as nursery,
        ):
            clients = [
                await stack.enter_async_context(part.open(runner, storage))
                for part in parts
            ]
            metrics_port = gateway_port = None
            extra: list[ExtraMetrics] = [c.metrics_text for c in clients]
            if any(_is_workflow(cls) for cls in entities):
                from ..workflows import workflow_metrics

                extra.append(workflow_metrics(runner).render)
            server = None
            if gateway is not None:
                definition, where = gateway
                try:
                    server = await nursery.start(
                        serve_gateway, runner, definition, where.host, where.port
                    )
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"--gateway {where}: {exc.strerror}"
                    ) from exc
                gateway_port = server.port
                extra.append(server.render_metrics)
            if metrics is not None:
                try:
                    metrics_port = await nursery.start(
                        partial(serve_metrics, extra_metrics=extra),
                        runner,
                        metrics.host,
                        metrics.port,
                    )
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"--metrics {metrics}: {exc.strerror}"
                    ) from exc
            await runner.wait_shards_acquired()
            print(
                json.dumps(
                    {
                        "event": "ready",
                        "address": str(runner.address),
                        "metrics_port": metrics_port,
                        "gateway_port": gateway_port,
                    }
                ),
                flush=True,
            )
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                break
            if server is not None:
                await server.aclose()  # clients reconnect to another runner
            nursery.cancel_scope.cancel()
    print(json.dumps({"event": "stopped"}), flush=True)


def _is_workflow(cls: type) -> bool:
    """Whether ``cls`` is the entity of a workflow's executions."""
    from ..workflows._entity import WorkflowEntity

    return issubclass(cls, WorkflowEntity)


def _run_db_command(
    command: str, fn: Callable[[], Awaitable[T]]
) -> tuple[int, T | None]:
    """Run a database command's coroutine: ``(0, result)``, or, after printing
    one line, ``(1, None)`` if the database failed and ``(2, None)`` for a bad
    DSN or prefix (`ConfigError`)."""
    from .._errors import ConfigError, PersistenceError

    try:
        return 0, trio.run(fn)
    except (ConfigError, PersistenceError) as exc:
        print(f"trio-cluster {command}: {exc}", file=sys.stderr)
        return (2 if isinstance(exc, ConfigError) else 1), None


def _migrate(args: argparse.Namespace) -> int:
    """Exit status 0, 1 if the database failed, 2 for a bad DSN or prefix."""
    from ..storage import migrate

    code, version = _run_db_command(
        "migrate", lambda: migrate(args.dsn, table_prefix=args.prefix)
    )
    if version is not None:
        print(f"schema {args.prefix!r} is at version {version}")
    return code


def _status(args: argparse.Namespace) -> int:
    """Exit status 0, 1 if the database failed, 2 for a bad DSN or prefix."""
    from ..storage import cluster_status

    code, status = _run_db_command(
        "status", lambda: cluster_status(args.dsn, table_prefix=args.prefix)
    )
    if status is not None:
        print(json.dumps(status.to_dict(), indent=2) if args.json else status.render())
    return code


def _check_messages(args: argparse.Namespace) -> int:
    """Exit status 0 if every stored message decodes, 1 if some would fail,
    2 for an operator error (bad target, DSN, prefix or variable; database
    unreachable, schema missing or outdated), printed as one line."""
    from .._errors import ConfigError, EntityDefinitionError, PersistenceError
    from .._operations._check_messages import check_messages
    from ..storage import PostgresStorage

    try:
        options = load_target(args.target)
    except SystemExit as exc:  # its message says what is wrong
        print(f"trio-cluster check-messages: {exc}", file=sys.stderr)
        return 2
    try:
        config = _config(args)
        storage = PostgresStorage(
            args.dsn, table_prefix=args.prefix, pool_size=1, auto_migrate=False
        )
        report = trio.run(
            lambda: check_messages(
                storage,
                entities=options.get("entities", ()),
                crons=options.get("crons", ()),
                converter=options.get("converter"),
                config=config,
            )
        )
    except (ConfigError, EntityDefinitionError, PersistenceError) as exc:
        # One line, also for libpq's multi-line messages.
        print(
            f"trio-cluster check-messages: {' '.join(str(exc).split())}",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-cluster",
        description="Distributed, persistent actors for Trio.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="a self-contained tour on memory storage (entities, persistence, streams, crashes)",
    )
    demo.add_argument(
        "--runners",
        type=int,
        default=1,
        help="run a cluster of N runners in this process and fail one over",
    )
    demo.set_defaults(handler=_demo)

    # No abbreviated options: `--secret VALUE` must not be taken for
    # `--secret-file VALUE` (and a secret printed as a file name).
    run = commands.add_parser(
        "run", help="run one runner of a cluster until SIGTERM", allow_abbrev=False
    )
    run.add_argument(
        "target",
        help="module:ATTRIBUTE with a list of entity classes, or a mapping of runner options",
    )
    run.add_argument("--dsn", required=True, help="PostgreSQL connection string")
    run.add_argument(
        "--listen",
        required=True,
        help="host:port to listen on for other runners (port 0: any); also the"
        " address they dial, unless --advertise says otherwise",
    )
    run.add_argument(
        "--advertise",
        help="host[:port] other runners dial to reach this one (when --listen"
        " is 0.0.0.0 or behind NAT); the port defaults to --listen's",
    )
    run.add_argument(
        "--prefix", default="trio_cluster", help="table prefix (one cluster per prefix)"
    )
    run.add_argument("--metrics", help="host:port for /metrics, /healthz and /readyz")
    run.add_argument(
        "--gateway",
        help="host:port to serve the target's realtime client gateway on"
        " (the target is a mapping with a 'gateway' key; see docs/gateway.md)",
    )
    run.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="stderr log format",
    )
    _add_security_options(run)
    run.set_defaults(handler=_run)

    migrate = commands.add_parser(
        "migrate", help="create or upgrade the PostgreSQL schema"
    )
    migrate.add_argument("--dsn", required=True)
    migrate.add_argument("--prefix", default="trio_cluster")
    migrate.set_defaults(handler=_migrate)

    status = commands.add_parser(
        "status", help="runners, shard owners, epochs and backlog"
    )
    status.add_argument("--dsn", required=True)
    status.add_argument("--prefix", default="trio_cluster")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    check = commands.add_parser(
        "check-messages",
        help="check that the given code decodes every stored, unprocessed"
        " persisted message (exit 1 if some would fail)",
    )
    check.add_argument(
        "target",
        help="module:ATTRIBUTE of the new code, as given to `run`",
    )
    check.add_argument("--dsn", required=True, help="PostgreSQL connection string")
    check.add_argument("--prefix", default="trio_cluster")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=_check_messages)
    add_dlq_parser(commands)
    add_events_parser(commands)
    add_webhooks_parser(commands)
    add_workflows_parser(commands)
    return parser


def _add_security_options(run: argparse.ArgumentParser) -> None:
    security = run.add_argument_group(
        "security",
        "Cluster secrets authenticate runners to each other; TLS encrypts"
        " their connections. Secrets never go on the command line: use"
        " --secret-file, TRIO_CLUSTER_SECRET_FILE or TRIO_CLUSTER_SECRET"
        " (secrets separated by whitespace). A runner listening on a"
        " non-loopback address needs secrets, mutual TLS or"
        " --allow-unauthenticated.",
    )
    security.add_argument(
        "--secret-file",
        metavar="PATH",
        help="file of cluster secrets, one per line (blank lines and #"
        " comments ignored); every one is accepted and proven, so add the new"
        " secret before removing the old one (default: TRIO_CLUSTER_SECRET_FILE)",
    )
    security.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="accept peers without a cluster secret or client certificate on"
        " a non-loopback address (only on a network you trust entirely)",
    )
    security.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate chain of this runner, naming its advertised host"
        " or IP in subjectAltName; with --tls-key, enables TLS"
        " (default: TRIO_CLUSTER_TLS_CERT)",
    )
    security.add_argument(
        "--tls-key",
        metavar="FILE",
        help="PEM private key of --tls-cert, unencrypted"
        " (default: TRIO_CLUSTER_TLS_KEY)",
    )
    security.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="PEM certificate of the authority that signs the runners'"
        " certificates (default: TRIO_CLUSTER_TLS_CA, else the system's"
        " trust store)",
    )
    security.add_argument(
        "--tls-mutual",
        action="store_true",
        help="mutual TLS: require a client certificate signed by --tls-ca"
        " from every peer that connects",
    )


def _configure_logging(log_format: str) -> None:
    """Log to stderr at ``TRIO_CLUSTER_LOG_LEVEL`` (default WARNING), with
    runner/shard/entity context; ``json`` gives one JSON object per line."""
    from .._errors import ConfigError
    from ..logs import ContextFilter, JsonFormatter

    level = os.environ.get("TRIO_CLUSTER_LOG_LEVEL", "WARNING").upper()
    if level not in _LEVELS:
        raise ConfigError(
            f"TRIO_CLUSTER_LOG_LEVEL={level!r} is not a log level"
            f" (known ones are {', '.join(_LEVELS)})"
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s [%(runner)s] %(message)s"
            )
        )
    handler.set_name("trio-cluster-cli")
    logger = logging.getLogger("trio_cluster")
    logger.handlers[:] = [
        h for h in logger.handlers if h.get_name() != "trio-cluster-cli"
    ]
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level))


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trio-cluster`` console script."""
    from .._errors import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    logger = logging.getLogger("trio_cluster")
    saved = (logger.level, list(logger.handlers))
    try:
        _configure_logging(getattr(args, "log_format", "text"))
        return int(args.handler(args))
    except ConfigError as exc:  # a bad TRIO_CLUSTER_LOG_LEVEL
        print(f"trio-cluster {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        # Leave logging as it was (main() may be called from a program).
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
