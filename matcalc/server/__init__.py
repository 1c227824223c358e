"""``matcalc serve``: the REST API (FastAPI) over the persistent store and the executor.

>>> from matcalc.server import Settings, create_app
>>> app = create_app(Settings(db_url="sqlite:///tasks.db"))   # doctest: +SKIP
"""

from matcalc.server.app import API_PREFIX, create_app
from matcalc.server.config import Settings, load_settings
from matcalc.server.errors import ApiError, ErrorCode

__all__ = ["API_PREFIX", "ApiError", "ErrorCode", "Settings", "create_app", "load_settings"]
