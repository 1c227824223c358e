"""``matcalc serve``: run the REST API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the REST API server (FastAPI + uvicorn)",
                       description="Settings come from these flags, then MATCALC_* variables, then the config "
                                   "file (--config, $MATCALC_CONFIG or ~/.matcalc/config.toml), then defaults.")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1; others need an API key)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--cluster", default=None,
                   help="process (default: supervised worker processes), inprocess (threads in the server: "
                        "tests, debugging), local (start a dask cluster), slurm or pbs (dask workers in batch "
                        "jobs: see cluster_options / the config file's [cluster] table) or a scheduler address")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (threads with inprocess); default one per CPU (memory permitting) "
                        "or per GPU; 0 queues tasks without running them")
    p.add_argument("--db", dest="db_url", default=None,
                   help="database URL (default $MATCALC_DB_URL or ~/.matcalc/matcalc.db)")
    p.add_argument("--api-key", dest="api_keys", action="append", default=None,
                   help="accepted X-API-Key (repeat for several); required beyond loopback")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: a GPU if torch sees one)")
    p.add_argument("--config", dest="config_file", default=None, help="TOML config file")
    p.add_argument("--max-upload-mb", type=float, default=None, help="request body limit (default 100 MB)")
    p.add_argument("--max-model-upload-mb", type=float, default=None,
                   help="largest custom model file accepted (default 4096 MB)")
    p.add_argument("--custom-models-dir", default=None,
                   help="where uploaded model files are kept (default ~/.matcalc/custom_models)")
    p.add_argument("--max-atoms", type=int, default=None, help="largest accepted structure (default 10000 atoms)")
    p.add_argument("--rate-limit", dest="rate_limit_per_s", type=float, default=None,
                   help="requests/s per API key (default 50; 0 disables)")
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout_s", type=float, default=None,
                   help="seconds to wait for running tasks on shutdown (default 30)")
    p.add_argument("--log-level", default=None, help="debug, info (default), warning, error")
    p.add_argument("--log-dir", default=None,
                   help="write JSON log files here (matcalc.jsonl, rotated daily, gzipped after 7 days, "
                        "packed by month after 30)")
    p.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="format of the log on stderr (default text; json: one JSON object per line)")
    add_setting_flags(p, exclude=set(NAMED_FLAGS))
    p.set_defaults(func=run_serve_command)


NAMED_FLAGS = ("host", "port", "cluster", "workers", "db_url", "api_keys", "device", "config_file", "max_upload_mb",
               "max_model_upload_mb", "custom_models_dir", "max_atoms", "rate_limit_per_s", "shutdown_timeout_s",
               "log_level", "log_dir", "log_format")
"""Settings with a hand-named flag above; every other setting gets ``--<name-with-dashes>``."""


def _flag_type(annotation: Any) -> tuple[Any, tuple[str, ...] | None, bool, bool]:
    """``(type, choices, is_list, is_bool)`` of a settings annotation (``X | None`` is ``X``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str, tuple(str(a) for a in typing.get_args(annotation)), False, False
    if origin is list:
        return str, None, True, False
    if annotation is bool:
        return bool, None, False, True
    return (annotation if annotation in (int, float, str) else str), None, False, False


def add_setting_flags(parser: argparse.ArgumentParser, exclude: set[str]) -> None:
    """One flag per setting of `Settings` not in ``exclude``, derived from
    the field (type, help from its docstring, the ``MATCALC_*`` variable named in the help)."""
    from matcalc.server.config import Settings, cli_flag, env_var

    group = parser.add_argument_group("other settings", "each also MATCALC_<NAME> or <name> in the config file")
    for name, info in Settings.model_fields.items():
        if name in exclude:
            continue
        typ, choices, is_list, is_bool = _flag_type(info.annotation)
        default = info.get_default(call_default_factory=True)
        doc = " ".join((info.description or "").split())
        help_ = f"{doc} " if doc else ""
        help_ += f"(default {default!r}; {env_var(name)})" if default not in (None, [], "") else f"({env_var(name)})"
        help_ = help_.replace("%", "%%")
        if is_bool:
            group.add_argument(cli_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_)
        elif is_list:
            group.add_argument(cli_flag(name), dest=name, action="append", default=None, metavar="VALUE",
                               help=help_ + "; repeat or comma-separate")
        else:
            group.add_argument(cli_flag(name), dest=name, type=typ, choices=choices, default=None, help=help_)


def settings_table() -> str:
    """The markdown table of every setting: TOML key, ``matcalc serve`` flag, ``MATCALC_*`` variable,
    default and meaning (docs/deployment.md holds it; ``python -m matcalc.server.cli`` prints it)."""
    from matcalc.server.config import Settings, env_var

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    serve = next(iter(parser._subparsers._group_actions[0].choices.values()))  # type: ignore[union-attr]
    flags = {a.dest: a for a in serve._actions if a.option_strings}
    rows = ["| setting (TOML) | flag | variable | default | meaning |", "|---|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        action = flags.get(name)
        flag = " / ".join(f"`{o}`" for o in action.option_strings) if action is not None else ""
        default = info.get_default(call_default_factory=True)
        doc = " ".join((info.description or "").split()) or (action.help if action is not None else "") or ""
        doc = doc.replace("|", "\\|").replace("%%", "%")
        shown = "" if default in (None, [], "") else f"`{default!r}`" if isinstance(default, str) else f"`{default}`"
        rows.append(f"| `{name}` | {flag} | `{env_var(name)}` | {shown} | {doc} |")
    return "\n".join(rows) + "\n"


def setting_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (``None``: not given); list flags are flattened."""
    from matcalc.server.config import Settings

    out: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(args, name, None)
        if isinstance(value, list):
            value = [v.strip() for item in value for v in str(item).split(",") if v.strip()]
        out[name] = value
    return out


def run_serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from matcalc.server.app import create_app
    from matcalc.server.config import load_settings
    from matcalc.server.middleware import RequestIdFilter

    flags = setting_flags(args)
    flags.pop("config_file", None)
    try:
        settings = load_settings(flags, config_file=args.config_file)
    except Exception as exc:  # pydantic ValidationError included: report, do not trace
        raise ValueError(str(exc)) from exc
    settings.check_security()

    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if settings.log_format == "json":
        from matcalc.server.logs import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5, timeout_keep_alive=65,
                            log_level=level)
    server = uvicorn.Server(config)
    print(f"matcalc serve: http://{settings.host}:{settings.port}  (docs at /docs, API under /api/v1; "
          f"executor {settings.cluster})", file=sys.stderr, flush=True)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":  # python -m matcalc.server.cli: the settings table of docs/deployment.md
    print(settings_table(), end="")
