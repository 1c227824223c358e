"""mkdocs hook: the property pages are rendered from the property declarations at build time.

``<!-- matcalc:params NAME -->`` becomes the parameter table of property NAME and
``<!-- matcalc:reference NAME -->`` its API reference entry (signature, description, parameters,
result), so the docs can never disagree with the code (`matcalc.calculations.contract`);
``<!-- matcalc:client options -->`` the task options every task takes (``matcalc.submission.TASK_OPTIONS``)
and ``<!-- matcalc:settings table -->`` every server setting with its flag and variable
(``matcalc.server.cli.settings_table``).
"""

from __future__ import annotations

import re
from typing import Any

PATTERN = re.compile(r"<!-- matcalc:(params|reference|client|settings) (\w+) -->")


def _render(what: str, name: str) -> str:
    from matcalc.calculations import get_property

    if what == "client":
        from matcalc.client import options_markdown

        return options_markdown()
    if what == "settings":
        from matcalc.server.cli import settings_table

        return settings_table()

    spec = get_property(name)
    return spec.markdown() if what == "params" else spec.reference_markdown()


def on_page_markdown(markdown: str, **_: Any) -> str:
    return PATTERN.sub(lambda m: _render(m.group(1), m.group(2)), markdown)
