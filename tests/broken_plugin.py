"""A model plugin that cannot import (its dependency is missing): matcalc must report it and go on."""

import matcalc_test_missing_dependency  # noqa: F401
