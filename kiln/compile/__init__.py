"""Graph-level optimisation: rewrite rules and passes over kiln's captured Graph.

Every pass follows kiln's pass contract (kiln.graph.passes): Graph in, PassResult(graph,
modified, record) out, a new ExportedProgram-backed Graph that `graph.module()` runs and
torch.export exports again. `optimize` runs the default pipeline.
"""
from __future__ import annotations

from typing import Callable, Sequence

from kiln.compile.attention import ATTENTION, RewriteAttention
from kiln.compile.fold import (AffineFoldRecord, BatchNormFoldRecord, FoldBatchNorm, FoldedAffine, FoldedBatchNorm,
                               FoldScaleShift)
from kiln.compile.fusion import (FUSE, FuseElementwise, FusionConfig, FusionRecord, FusionRegion, FusionRole,
                                 FusionTag, MarkFusion, fusion_tag)
from kiln.compile.layout import ChannelsLast, ChannelsLastInputs, ChannelsLastRecord, MemoryFormat, channels_last, \
    preferred_format
from kiln.compile.passes import (PASSES, CSERecord, DCEConfig, DCERecord, EliminateCommonSubexpressions,
                                 EliminateDeadCode, FoldConfig, FoldConstants, FoldRecord, NoConfig, build_pass)
from kiln.compile.rewrite import ANY, Fn, Lit, Match, Op, P, Rewrite, RewriteRecord, Rule, RuleSet, Var, op
from kiln.compile.rules import SIMPLIFY, Simplify
from kiln.compile.verify import EagerOracle, Tolerance, relative_error, reexport, to_module
from kiln.graph.graph import Graph
from kiln.graph.passes import Pass, PassManager, PassResult


def default_passes(channels_last: bool = False) -> list[Pass]:
    """simplify, cse, fold_constants, fold_batch_norm, fold_scale_shift, attention, fuse, dce,
    [channels_last], mark_fusion: each one's output feeds the next."""
    passes: list[Pass] = [
        Simplify(), EliminateCommonSubexpressions(), FoldConstants(), FoldBatchNorm(), FoldScaleShift(),
        RewriteAttention(), FuseElementwise(), EliminateDeadCode(),
    ]
    if channels_last:
        passes.append(ChannelsLast())
    return passes + [MarkFusion()]


def optimize(graph: Graph, passes: Sequence[Pass] | None = None, verify: Callable[[Graph], None] | None = None,
             until_fixed_point: bool = True) -> PassResult:
    """Run `passes` (default_passes() when None) in order, `verify` after each, repeating
    until none changes the graph (one pass's result can open work for an earlier one); the
    record is [(pass name, its record), ...] over every round."""
    passes = list(passes) if passes is not None else default_passes()
    return PassManager(passes, verify=verify, until_fixed_point=until_fixed_point).run(graph)


__all__ = [
    # running passes
    "PASSES", "build_pass", "default_passes", "optimize", "EagerOracle", "Tolerance", "relative_error",
    "to_module", "reexport",
    # rewrite rules as data
    "ANY", "Fn", "Lit", "Match", "Op", "P", "Var", "op", "Rule", "RuleSet", "Rewrite", "RewriteRecord",
    "SIMPLIFY", "Simplify", "ATTENTION", "RewriteAttention", "FUSE", "FuseElementwise",
    # passes, their configs and records
    "NoConfig", "EliminateDeadCode", "DCEConfig", "DCERecord", "EliminateCommonSubexpressions", "CSERecord",
    "FoldConstants", "FoldConfig", "FoldRecord", "FoldBatchNorm", "BatchNormFoldRecord", "FoldedBatchNorm",
    "FoldScaleShift", "AffineFoldRecord", "FoldedAffine", "MarkFusion", "FusionConfig", "FusionRecord",
    "FusionRegion", "FusionRole", "FusionTag", "fusion_tag", "ChannelsLast", "ChannelsLastRecord", "MemoryFormat",
    "preferred_format", "channels_last", "ChannelsLastInputs",
]
