"""``matcalc serve``: run the REST API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the REST API server (FastAPI + uvicorn)",
                       description="Settings come from these flags, then MATCALC_* variables, then the config "
                                   "file (--config, $MATCALC_CONFIG or ~/.matcalc/config.toml), then defaults.")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1; others need an API key)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--cluster", default=None,
                   help="inprocess (default: threads in the server), local (start a dask cluster) "
                        "or a scheduler address")
    p.add_argument("--workers", type=int, default=None, help="in-process worker threads (default 2)")
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
    p.set_defaults(func=run_serve_command)


def run_serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from matcalc.server.app import create_app
    from matcalc.server.config import load_settings
    from matcalc.server.middleware import RequestIdFilter

    flags = {k: getattr(args, k) for k in ("host", "port", "cluster", "workers", "db_url", "api_keys", "device",
                                           "max_upload_mb", "max_model_upload_mb", "custom_models_dir", "max_atoms", "rate_limit_per_s", "shutdown_timeout_s",
                                           "log_level", "log_dir", "log_format")}
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
