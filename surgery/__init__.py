"""Surgery on any ``nn.Module`` around the dropout family.

Public API: ``find_sites`` / ``register_site_type`` / ``Site`` (surgery.sites), ``fold`` (surgery.fold),
``to_mc`` (surgery.mc), ``split`` / ``SplitModel`` (surgery.split), ``recalibrate_batchnorm``
(surgery.batchnorm), ``mc_predict`` / ``MCEngine`` / ``MCResult`` (surgery.engine), ``export_mc_onnx``
(surgery.mc_export). Each import is guarded so that a sibling module that is missing or broken in a partial
checkout does not break the others.
"""

from __future__ import annotations

import importlib

__all__: list[str] = []


def _export(module: str, *names: str) -> None:
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{module}":
            raise
        return
    for name in names:
        globals()[name] = getattr(mod, name)
        __all__.append(name)


_export("sites", "Site", "find_sites", "register_site_type")
_export("fold", "FoldReport", "fold")
_export("mc", "NoStochasticSiteError", "to_mc")
_export("split", "SplitModel", "split")
_export("batchnorm", "BatchNormReport", "recalibrate_batchnorm")

_export("engine", "MCEngine", "MCResult", "mc_predict")
_export("mc_export", "export_mc_onnx")
