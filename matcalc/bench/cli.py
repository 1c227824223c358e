"""``matcalc bench mofsimbench``: the command-line face of `matcalc.bench.mofsimbench`."""

from __future__ import annotations

import argparse
from typing import Any


def add_bench_parser(sub: Any) -> None:
    """Register ``matcalc bench`` (with its one benchmark, ``mofsimbench``) on argparse sub-parsers."""
    from matcalc.bench.tasks import TASKS

    bench = sub.add_parser("bench", help="benchmark a model: matcalc bench mofsimbench --model NAME ...")
    which = bench.add_subparsers(dest="benchmark", required=True)
    p = which.add_parser(
        "mofsimbench", help="run MOFSimBench's tasks on a model and score them against DFT",
        description="Run MOFSimBench (optimisation, MD stability, bulk modulus, heat capacity, interaction energy) "
                    "on every structure of its sets under --structures (MOFSimBench's experiments/structures layout: "
                    "main_set/, hcmof/, golddac/, structures.yaml), then its metrics against the DFT references "
                    "shipped with matcalc. Results go to --out as they finish; rerunning the same command skips "
                    "finished structures.")
    p.add_argument("--model", required=True, help="model name (e.g. chgnet, sevennet+d3)")
    p.add_argument("--structures", required=True, help="folder with main_set/, hcmof/, golddac/ (and structures.yaml)")
    p.add_argument("--out", required=True, help="output folder (per-structure CSVs, summary.json, plots)")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS)} "
                                                 "(default: every task whose folder exists)")
    p.add_argument("--protocol", default=None, help="mofsimbench (default: MOFSimBench's scripts) or fast")
    p.add_argument("--cluster", default="inprocess",
                   help="inprocess (default), local (a dask cluster on this machine), or a scheduler address")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N structures per task (interaction_energy: all; a complex needs its framework and gas)")
    p.add_argument("--smallest", action="store_true", help="with --limit: the N smallest cells of each set")
    p.add_argument("--golddac-reference", default=None, help="GoldDAC test.xyz with the DFT energies "
                                                             "(default: looked for under --structures)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="TASK.NAME=VALUE",
                   help="override one parameter of one task, e.g. -p stability.npt_steps=5000")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: a GPU if torch sees one)")
    p.add_argument("--workers", type=int, default=None, help="in-process threads or local cluster workers")
    p.add_argument("--no-cache", action="store_true", help="compute every structure even when the result cache "
                                                          "holds it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_mofsimbench)


def task_params(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``["stability.npt_steps=5000"]`` -> ``{"stability": {"npt_steps": 5000}}`` (values read as JSON when they
    are JSON, else kept as text; the property's declaration checks them)."""
    import json

    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        head, sep, text = pair.partition("=")
        task, dot, name = head.partition(".")
        if not sep or not dot or not task.strip() or not name.strip():
            raise ValueError(f"--param must look like TASK.NAME=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.setdefault(task.strip(), {})[name.strip()] = value
    return out


def cmd_mofsimbench(args: argparse.Namespace) -> int:
    from matcalc.bench.benchmark import mofsimbench

    summary = mofsimbench(args.model, args.structures, args.out, tasks=args.tasks, protocol=args.protocol,
                          cluster=args.cluster, limit=args.limit, smallest=args.smallest,
                          params=task_params(args.param), device=args.device, workers=args.workers,
                          cache=False if args.no_cache else None, golddac_reference=args.golddac_reference,
                          show_progress=not args.no_progress)
    for line in summary.leaderboard():
        print(line)
    print(f"matcalc bench mofsimbench: {len(summary.tasks)} task(s) in {summary.wall_time_s:.1f} s -> "
          f"{summary.out}/summary.json")
    return 1 if any(t.n_failed for t in summary.tasks.values()) else 0
