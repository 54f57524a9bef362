"""Surgery on any ``nn.Module`` around the dropout family.

Public API: ``find_sites`` / ``register_site_type`` / ``Site`` (sites), ``fold`` / ``fold_with_report`` /
``FoldResult`` (fold), ``to_mc`` / ``MCModel`` (mc), ``split`` / ``SplitModel`` (split), ``recalibrate_batchnorm``
(batchnorm), ``mc_predict`` / ``MCEngine`` / ``MCResult`` (engine), ``export_mc_onnx`` (mc_export).
"""

from __future__ import annotations

from dropwise.surgery.batchnorm import BatchNormReport, recalibrate_batchnorm
from dropwise.surgery.engine import MCEngine, MCResult, mc_predict
from dropwise.surgery.fold import FoldReport, FoldResult, fold, fold_with_report
from dropwise.surgery.mc import MCModel, NoStochasticSiteError, to_mc
from dropwise.surgery.mc_export import export_mc_onnx
from dropwise.surgery.sites import Site, find_sites, register_site_type
from dropwise.surgery.split import SplitModel, split

__all__ = [
    "BatchNormReport",
    "FoldReport",
    "FoldResult",
    "MCEngine",
    "MCModel",
    "MCResult",
    "NoStochasticSiteError",
    "Site",
    "SplitModel",
    "export_mc_onnx",
    "find_sites",
    "fold",
    "fold_with_report",
    "mc_predict",
    "recalibrate_batchnorm",
    "register_site_type",
    "split",
    "to_mc",
]
