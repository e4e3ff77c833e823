"""Hardware-aware SPViT (docs/method.md §11.4): latency tables of the deployed model, a differentiable latency model
for the search, and aligned FFN widths.

* :func:`profile` (``spvit profile``) measures, on one device / dtype / batch size, the latency of the pieces of the
  DEPLOYED model (:mod:`spvit.deploy`, the fused modules that actually run) at the model's real shapes: per block
  the attention residual for each choice (MSA, 3x3, 1x1, skip) and the FFN residual at widths on a grid, plus the
  fixed parts (patch embedding with class token and position embedding; final norm, pooling and head; for Swin also
  each stage's PatchMerging). Blocks of the same shape share one set of measurements (every ViT block has the same
  shapes: measured once; Swin: one set per stage and shift, :class:`SwinPieces`). The result is a
  :class:`LatencyTable` (JSON; written atomically, never over an existing file without ``force``).
* The prediction of a fixed architecture is the sum of its pieces: fixed parts + per block the attention choice's
  entry + the FFN entry, linearly interpolated between grid widths.
* :class:`LatencyObjective` is the search's complexity term when a table is given: the same complexity indicators
  as the FLOPs loss (docs/method.md §2.4) weight the attention entries (cumulative gates ê₁, ê₃, êₘ) and the FFN
  latency is the piecewise-linear interpolation at the expected kept width Σⱼ ĝⱼ, so the predicted latency is a
  differentiable function of the gate logits exactly as the FLOPs are, and equals the table's prediction of the
  read-out architecture at the current logits.
* :func:`aligned_keep` / :func:`align_architecture`: read-out of a multiple of N units per FFN (``--ffn-align``).

Families plug in through a small "pieces" interface (:class:`Pieces`): what to measure per shape group, and the
per-block indicators of a supernet (:func:`block_indicators`). ViT/DeiT (:class:`ViTPieces`) and Swin
(:class:`SwinPieces`; the supernet's blocks in block order, stage by stage) are implemented.

The modules, by job:

* :mod:`~spvit.latency.timer`: dtype and device names, the CPU allocator's regime, the adaptive timer;
* :mod:`~spvit.latency.table`: the table format, its checks and the prediction of a fixed architecture;
* :mod:`~spvit.latency.objective`: the search's differentiable latency term and its target;
* :mod:`~spvit.latency.align`: aligned FFN widths;
* :mod:`~spvit.latency.pieces`: the interface of a family's pieces and the helpers families share;
  :mod:`~spvit.latency.vit_pieces` and :mod:`~spvit.latency.swin_pieces`: the pieces of each family;
* :mod:`~spvit.latency.family`: every family-specific decision of the latency code (which pieces, how a model's
  family is recognised, timm arguments from a signature);
* :mod:`~spvit.latency.profiling`: measuring a table, and the dense deployed model of a timm name;
* :mod:`~spvit.latency.validate`: predicted against measured latency.

The table, the objective and the alignment do not import the deployment code; profiling and the pieces do.
"""
from .align import align_architecture, aligned_count, aligned_keep
from .family import timm_kwargs
from .objective import LatencyObjective, block_indicators, predicted_ms_tensor, resolve_target
from .pieces import Pieces
from .profiling import dense_deployed, profile
from .swin_pieces import SwinPieces
from .table import BlockGroup, LatencyTable, LatencyTableError, interp, load_table
from .timer import (CLOCKS, DTYPES, STATS, device_class, device_name, dtype_name, malloc_state, set_steady_malloc,
                    time_ms)
from .validate import compare, measure_model
from .vit_pieces import ViTPieces

__all__ = ["LatencyTable", "BlockGroup", "LatencyTableError", "LatencyObjective", "Pieces", "ViTPieces",
           "SwinPieces",
           "profile", "load_table", "predicted_ms_tensor", "block_indicators", "resolve_target", "aligned_count",
           "aligned_keep", "align_architecture", "compare", "measure_model", "dense_deployed", "device_class",
           "time_ms", "interp", "set_steady_malloc", "malloc_state", "timm_kwargs", "CLOCKS", "DTYPES", "STATS",
           "device_name", "dtype_name"]
