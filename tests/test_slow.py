"""The slow tier: every transformers type kiln builds, captured and counted (benchmarks/capture_flops.py
measures the same for BENCHMARKS.md)."""
import pytest

from kiln.analysis.cost import AnnotateCost
from kiln.analysis.oracle import flop_counter_flops
from kiln.errors import KilnError
from kiln.graph.capture import capture
from kiln.models.hf_config import SUPPORTED
from kiln.models.spec import load


@pytest.mark.slow
def test_capture_rate_and_flops_over_every_supported_type():
    captured, failures = 0, []
    for model_type in sorted(SUPPORTED):
        loaded = load(f"hf-config:{model_type}")
        try:
            graph = capture(loaded)
        except KilnError as exc:
            assert "\n" not in str(exc)
            failures.append(model_type)
            continue
        captured += 1
        expected = flop_counter_flops(loaded)
        assert abs(AnnotateCost()(graph).record.flops - expected) <= 0.01 * expected, model_type
    assert captured / len(SUPPORTED) >= 0.95, failures
