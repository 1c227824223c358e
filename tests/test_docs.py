"""The documentation builds with ``mkdocs build --strict`` (warnings are errors), its API reference
is generated from the docstrings, and what it states about the code is still true: the protocol
tables equal ``PROTOCOLS`` and the troubleshooting page quotes the errors the code raises today."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from ase.build import bulk, molecule

import matcalc as mc
from matcalc.calculations.protocols import PROTOCOLS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_strict_build_and_api_reference(site):
    assert (site / "index.html").is_file()
    for page in ("install", "guide/properties", "deployment", "troubleshooting", "reference/widgets"):
        assert (site / page / "index.html").is_file(), page
    ref = (site / "reference" / "calculations" / "index.html").read_text()
    for module, fn in [("single_point", "single_point"), ("relax", "relax"), ("bulk_modulus", "bulk_modulus"),
                       ("heat_capacity", "heat_capacity"), ("stability", "stability"),
                       ("interaction", "interaction_energy")]:
        assert f'id="matcalc.calculations.{module}.{fn}"' in ref, fn
    # docstring text made it into the page (mkdocstrings rendered it, not just a heading)
    assert "Birch" in ref or "birchmurnaghan" in ref
    widgets = (site / "reference" / "widgets" / "index.html").read_text()
    assert "task-like" in widgets and "max_rate_hz" in widgets
    assert (site / "img" / "progress_widget.png").is_file()


SPHINX_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|meth|attr|exc|obj|const):(?:`|<code>)")
"""A Sphinx role in a docstring (``:func:`x```), or as markdown renders it (``:func:<code>x</code>``)."""


def test_no_sphinx_roles_left(site):
    """mkdocstrings reads the docstrings as markdown: a Sphinx role (:func:`x`) would show as literal text in the
    API reference. None is left in the built site, nor in the docstrings it is built from."""
    pages = {p.relative_to(site): p.read_text(encoding="utf-8") for p in site.rglob("*.html")}
    assert len(pages) > 10
    found = {str(page): SPHINX_ROLE.findall(text)[:3] for page, text in pages.items() if SPHINX_ROLE.search(text)}
    assert not found, found
    sources = [p for p in (ROOT / "matcalc").rglob("*.py") if SPHINX_ROLE.search(p.read_text(encoding="utf-8"))]
    assert not sources, sources
    # the converted references still render as code in the API reference
    assert "<code>matcalc.load_structure</code>" in (site / "reference" / "calculations" / "index.html").read_text()


def test_parameter_tables_are_the_declarations(site):
    """The docs' parameter tables are rendered from the declarations (docs/hooks.py), never typed by hand."""
    sys.path.insert(0, str(DOCS))
    try:
        import hooks
    finally:
        sys.path.remove(str(DOCS))
    guide = hooks.on_page_markdown((DOCS / "guide" / "properties.md").read_text())
    html = (site / "guide" / "properties" / "index.html").read_text()
    for name, spec in mc.calculations.properties().items():
        if spec.params:
            assert spec.markdown() in guide, name
        for p in spec.params:
            assert f"<code>{p.name}</code>" in html, (name, p.name)
            for proto, value in PROTOCOLS.items():
                assert value[name].get(p.name) == p.default_for(proto)
    ref = hooks.on_page_markdown((DOCS / "reference" / "calculations.md").read_text())
    assert "<!-- matcalc:" not in guide + ref


def _message(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError("no error raised")


def test_troubleshooting_quotes_the_real_messages():
    text = (DOCS / "troubleshooting.md").read_text()
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cases = [
        lambda: mc.relax("no-such.cif", "emt"),
        lambda: mc.load_structure("data_x\n_cell_length_a 3\n"),
        lambda: mc.relax(molecule("H2O"), "emt"),
        lambda: mc.load_structure(cu.repeat(30)),
        lambda: mc.single_point(bulk("Fe", "bcc", a=2.87), "emt"),
        lambda: mc.relax(cu, "emt", fmax=-1),
        lambda: mc.relax(cu, "emt", optimizer="SGD"),
        lambda: mc.relax(cu, "emt", protocol="quick"),
        lambda: mc.bulk_modulus(cu, "emt", eos="poly"),
        lambda: mc.bulk_modulus(cu, "emt", strain=0.7),
        lambda: mc.heat_capacity(cu, "emt", supercell=(0, 1, 1)),
        lambda: mc.stability(cu, "emt", ensemble="nve"),
        lambda: mc.interaction_energy(cu, "XeF6", "emt"),
        lambda: mc.interaction_energy(cu, model="emt"),
        lambda: mc.cluster.check_priority("URGENT"),
        lambda: mc.calculations.property_function("band_gap"),
    ]
    for case in cases:
        msg = _message(case)
        assert msg in text, f"troubleshooting.md does not quote: {msg}"
    unknown = _message(lambda: mc.get_model("mace"))
    assert re.sub(r"available: .*", "", unknown) in text
