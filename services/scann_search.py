"""The one place that imports ScaNN.

``import scann`` runs ``scann/__init__.py``, which loads ScaNN's TensorFlow ops; those are
built for TF 2.20 and fail beside TF 2.21. Only the numpy API (``scann_ops_pybind``) is
needed, so the package is registered without running its ``__init__`` and the pybind
module is imported directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _load_scann_ops_pybind() -> types.ModuleType:
    if "scann" not in sys.modules:
        spec = importlib.util.find_spec("scann")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("scann is not installed (pip install scann==1.4.2)")
        package = types.ModuleType("scann")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["scann"] = package
    return importlib.import_module("scann.scann_ops.py.scann_ops_pybind")


scann_ops_pybind = _load_scann_ops_pybind()
