"""The ``matcalc`` console script.

Each sub-command lives in a small ``_cmd_*`` function registered in `COMMANDS`;
heavy imports happen inside them so ``matcalc --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from matcalc.version import version_text

log = logging.getLogger(__name__)

DEMO_STRUCTURE = "CALF-20"


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="relax a shipped MOF with CHGNet in-process and print the result table")
    p.add_argument("--structure", default=DEMO_STRUCTURE, help=f"builtin name or file (default {DEMO_STRUCTURE})")
    p.add_argument("--model", default="chgnet", help="model name (default chgnet)")
    p.add_argument("--protocol", default="mofsimbench", help="mofsimbench (default) or fast")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: GPU if available)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import pandas as pd
    from tqdm.auto import tqdm

    from matcalc import progress
    from matcalc.calculations.relax import relax

    print(f"matcalc demo: relaxing {args.structure} with {args.model} ({args.protocol} protocol), in-process")
    bar = tqdm(desc="relax", unit="step", leave=False)

    def sink(event: progress.ProgressEvent) -> None:
        bar.set_postfix(E=f"{event.energy_eV:.4f} eV", fmax=f"{event.fmax_eV_per_A:.2e}")
        bar.update(1)

    with progress.reporting(sink):
        result = relax(args.structure, args.model, protocol=args.protocol, device=args.device)
    bar.close()
    row = result.row()
    with pd.option_context("display.max_colwidth", 70, "display.width", 120):
        print(pd.Series(row, name=result.label or args.structure).to_string())
    for w in result.warnings:
        print(f"warning: {w}")
    return 0


# --------------------------------------------------------------------------- models
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models and whether they can load here")
    p.add_argument("--device", default=None)
    p.add_argument("--no-d3", action="store_true", help="hide the '+d3' variants")
    p.add_argument("--long", action="store_true", help="every field (description, elements, full reasons)")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    import pandas as pd

    from matcalc.models import list_models

    cards = list_models(device=args.device, include_d3=not args.no_d3)
    frame = pd.DataFrame([c.to_dict() for c in cards]).drop(columns=["extras"])
    if args.long:
        with pd.option_context("display.max_colwidth", None, "display.width", 400):
            print(frame.to_string(index=False))
        _print_plugins()
        return 0
    frame["available"] = [("yes" if c.available else "no: " + _short_reason(c.reason)) for c in cards]
    cols = ["name", "family", "dtype", "batching", "cutoff_A", "device", "available"]
    table = frame[cols].map(lambda v: "-" if v is None or (isinstance(v, float) and v != v) else str(v))
    widths = {c: max(len(c), *(len(v) for v in table[c])) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for _, row in table.iterrows():
        print("  ".join(str(row[c]).ljust(widths[c]) for c in cols).rstrip())
    print("\n(--long for descriptions, elements and the full reasons)")
    _print_plugins()
    return 0


def _print_plugins() -> None:
    """The model plugins (MATCALC_PLUGINS, entry points) and whether each imported."""
    from matcalc.models import plugin_status

    statuses = plugin_status()
    if not statuses:
        return
    print("\nmodel plugins:")
    for s in statuses:
        state = f"ok ({', '.join(s.models) or 'no new models'})" if s.loaded else f"FAILED to import: {s.error}"
        print(f"  {s.name} [{s.source}]: {state}")


def _short_reason(reason: str) -> str:
    """``weights file not found: /x/y.pth; place ...`` -> ``missing /x/y.pth``."""
    if reason.startswith("weights file not found: "):
        return "missing " + reason.split(": ", 1)[1].split(";", 1)[0]
    return reason.split(";", 1)[0]


# --------------------------------------------------------------------------- db
def _add_db(sub: argparse._SubParsersAction) -> None:
    from matcalc.store.cli import add_db_command

    add_db_command(sub)


# --------------------------------------------------------------------------- cache
def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="the result cache: stats, clear, export",
                       description="Results are cached by structure, property, parameters, model identity (weights "
                                   "sha256, dtype) and matcalc's cache version in MATCALC_CACHE_URL (default: the "
                                   "store, ~/.matcalc/matcalc.db). MATCALC_CACHE=0 turns the cache off.")
    p.add_argument("--url", default=None, help="database URL (default: MATCALC_CACHE_URL, MATCALC_DB_URL, "
                                               "~/.matcalc/matcalc.db)")
    actions = p.add_subparsers(dest="action", required=True)
    stats = actions.add_parser("stats", help="entries, size, hits, per property and model")
    stats.add_argument("--json", action="store_true", help="print JSON")
    clear = actions.add_parser("clear", help="delete entries (all, or those matching every filter given)")
    export = actions.add_parser("export", help="write entries as JSON lines (key, its components, the result)")
    export.add_argument("out", help="output file (.jsonl), - for stdout")
    for q in (clear, export):
        q.add_argument("--property", default=None, help="only this property (relax, bulk_modulus, ...)")
        q.add_argument("--model", default=None, help="only this model name")
    clear.add_argument("--older-than-days", type=float, default=None, help="only entries older than this")
    clear.add_argument("--stale", action="store_true", help="only entries of an older cache version")
    p.set_defaults(func=_cmd_cache)


def _cmd_cache(args: argparse.Namespace) -> int:
    import json
    from datetime import UTC, datetime, timedelta

    from matcalc.cache import ResultCache

    cache = ResultCache(args.url)
    try:
        if args.action == "stats":
            st = cache.stats()
            if args.json:
                print(json.dumps(st.to_dict(), indent=2))
                return 0
            print(f"result cache: {st.url}")
            print(f"  entries: {st.entries} ({st.size_bytes / 1024**2:.2f} MiB), hits: {st.hits}, "
                  f"stale (older cache version): {st.stale}")
            if st.entries:
                print(f"  oldest: {st.oldest:%Y-%m-%d %H:%M} UTC, newest: {st.newest:%Y-%m-%d %H:%M} UTC")
            for title, counts in (("property", st.by_property), ("model", st.by_model)):
                for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                    print(f"  {title} {name}: {n}")
            return 0
        if args.action == "clear":
            before = None
            if args.older_than_days is not None:
                before = datetime.now(UTC) - timedelta(days=args.older_than_days)
            n = cache.clear(prop=args.property, model=args.model, before=before, stale=args.stale)
            print(f"matcalc cache: {n} entr{'y' if n == 1 else 'ies'} deleted")
            return 0
        out = sys.stdout if args.out == "-" else args.out
        n = cache.export(out, prop=args.property, model=args.model)
        if args.out != "-":
            print(f"matcalc cache: {n} entr{'y' if n == 1 else 'ies'} written to {args.out}")
        return 0
    finally:
        cache.close()


# --------------------------------------------------------------------------- run
def _add_run(sub: argparse._SubParsersAction) -> None:
    from matcalc.runner import add_run_parser  # the command lives in matcalc/runner.py

    add_run_parser(sub)


# --------------------------------------------------------------------------- bench
def _add_bench(sub: argparse._SubParsersAction) -> None:
    from matcalc.bench.cli import add_bench_parser  # the command lives in matcalc/bench/cli.py

    add_bench_parser(sub)


# --------------------------------------------------------------------------- serve
def _add_serve(sub: argparse._SubParsersAction) -> None:
    from matcalc.server.cli import add_serve_command

    add_serve_command(sub)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo, _add_models, _add_db, _add_cache, _add_run,
                                                                _add_bench, _add_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matcalc", description="Materials properties with universal ML potentials")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    parser.add_argument("--version", action="version", version=version_text(),
                        help="which matcalc this is (version and distribution) and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"matcalc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
