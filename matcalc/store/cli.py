"""``matcalc db upgrade|downgrade|current|backup|restore``: the store's schema (Alembic) and backups."""

from __future__ import annotations

import argparse


def add_db_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="manage the task database (migrations)")
    p.add_argument("--db", default=None, help="database URL (default: $MATCALC_DB_URL or ~/.matcalc/matcalc.db)")
    actions = p.add_subparsers(dest="db_action", required=True)
    up = actions.add_parser("upgrade", help="apply migrations (default: to the newest)")
    up.add_argument("revision", nargs="?", default="head")
    down = actions.add_parser("downgrade", help="revert migrations down to REVISION ('base' drops everything)")
    down.add_argument("revision")
    actions.add_parser("current", help="print the database's revision and the newest one")
    bk = actions.add_parser("backup", help="write a consistent copy of the database to PATH (SQLite online "
                            "backup; pg_dump custom format for PostgreSQL)")
    bk.add_argument("path")
    rs = actions.add_parser("restore", help="replace the database's contents with the backup at PATH "
                            "(stop the server first)")
    rs.add_argument("path")
    p.set_defaults(func=run_db_command)


def run_db_command(args: argparse.Namespace) -> int:
    from matcalc.store import db

    engine = db.make_engine(args.db)
    try:
        where = db.redact_url(engine.url.render_as_string(hide_password=False))
        if args.db_action == "upgrade":
            db.upgrade(engine, args.revision)
            print(f"{where}: at revision {db.current_revision(engine)}")
        elif args.db_action == "backup":
            from matcalc.store.backup import backup

            print(f"{where}: backup written to {backup(engine, args.path)}")
        elif args.db_action == "restore":
            from matcalc.store.backup import restore

            restore(engine, args.path)
            print(f"{where}: restored from {args.path} (revision {db.current_revision(engine)})")
        elif args.db_action == "downgrade":
            db.downgrade(engine, args.revision)
            print(f"{where}: at revision {db.current_revision(engine)}")
        else:
            current = db.current_revision(engine)
            head = db.head_revision()
            state = "up to date" if current == head else "needs `matcalc db upgrade`"
            print(f"{where}: revision {current} (newest {head}; {state})")
        return 0
    finally:
        engine.dispose()
