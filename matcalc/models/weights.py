"""Local weight files of the optional model families, and the catalogue entries that name them.

matcalc never downloads weights. A catalogue model (``mace-mpa-0-medium``, ``orb-v3-conservative-inf-omat``,
...) loads from ``<models dir>/<file>``, where the models dir is ``$MATCALC_MODELS_DIR`` or
``~/.matcalc/models``. A model whose file is absent is listed as unavailable with the exact path it needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matcalc.models.base import Potential

MODELS_DIR_ENV = "MATCALC_MODELS_DIR"

Loader = Callable[..., "Potential"]
"""``loader(path, *, name, device, **options) -> Potential``: a family's file loader (``path`` is ``None``
for weights shipped inside the package)."""


def models_dir() -> Path:
    """Where catalogue weight files are looked up: ``$MATCALC_MODELS_DIR`` or ``~/.matcalc/models``."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".matcalc" / "models"


@dataclass(frozen=True)
class WeightsEntry:
    """One named model of a family's catalogue (names follow the MOFSimBench catalogue)."""

    name: str
    filename: str
    """File name inside `models_dir`; an absolute path is used as is; ``""`` when the weights ship
    inside the family's package."""
    description: str = ""
    elements: str = "all"
    cutoff_A: float | None = None
    dtype: str = "float32"
    source: str = ""
    """Where a user obtains the file (printed in the unavailable reason; never fetched by matcalc)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to the family loader (e.g. a task head or a fidelity)."""

    def path(self) -> Path | None:
        """The weight file to load (``None`` when the package ships the weights)."""
        if not self.filename:
            return None
        p = Path(self.filename).expanduser()
        return p if p.is_absolute() else models_dir() / p

    def missing_reason(self) -> str | None:
        """Why the weights cannot be loaded here, or ``None``."""
        p = self.path()
        if p is None or p.is_file():
            return None
        where = f" ({self.source})" if self.source else ""
        return (f"weights file not found: {p}; place the file there{where} or point ${MODELS_DIR_ENV} "
                f"to the folder holding it (matcalc never downloads weights)")


@dataclass(frozen=True)
class Family:
    """What a family module declares: its packages, loader and catalogue."""

    name: str
    requires: tuple[str, ...]
    """Import names of the packages the family needs."""
    install_hint: str
    loader: Loader
    catalogue: tuple[WeightsEntry, ...] = ()
    supports_batching: bool = True
    """True when the family's own inference evaluates many structures in one call."""
    custom_formats: tuple[str, ...] = ()
    """Formats a user may upload for this family (``"torchscript"``, ``"weights_only"``)."""
    weights_only_globals: Callable[[], list[Any]] | None = None
    """Extra globals the family's checkpoints need under ``torch.load(weights_only=True)`` (data types only,
    e.g. numpy arrays; never anything that runs code)."""
