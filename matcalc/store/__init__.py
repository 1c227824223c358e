"""Persistent store (SQLAlchemy 2.x): tasks, structures, custom models, task logs, alerts, webhooks.

SQLite file by default (``~/.matcalc/matcalc.db``), PostgreSQL by URL (``MATCALC_DB_URL``);
schema managed by Alembic migrations shipped in the package (``matcalc db upgrade``).
"""

from matcalc.store.db import current_revision, default_url, downgrade, head_revision, make_engine, upgrade
from matcalc.store.models import Alert, CustomModel, Structure, Task, TaskLog, WebhookDelivery
from matcalc.store.repository import (
    DuplicateError,
    ImmutableResultError,
    NewStructure,
    NewTask,
    NotFoundError,
    Page,
    Store,
    StoreError,
    TaskFilter,
)
from matcalc.tasks import ACTIVE, TERMINAL, Priority, TaskStatus  # the lifecycle, for the store's users

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "Alert",
    "CustomModel",
    "DuplicateError",
    "ImmutableResultError",
    "NewStructure",
    "NewTask",
    "NotFoundError",
    "Page",
    "Priority",
    "Store",
    "StoreError",
    "Structure",
    "Task",
    "TaskFilter",
    "TaskLog",
    "TaskStatus",
    "WebhookDelivery",
    "current_revision",
    "default_url",
    "downgrade",
    "head_revision",
    "make_engine",
    "upgrade",
]
