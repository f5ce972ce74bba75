"""AlphaRamp: ALBEF's distillation-weight warm-up, alpha * min(1, step / steps)."""
import pytest

import albef_fast


def test_alpha_ramp_is_albefs_warmup():
    ramp = albef_fast.AlphaRamp(0.4, 10)
    assert [ramp(s) for s in (0, 5, 10, 25)] == [0.0, 0.2, 0.4, 0.4]


def test_alpha_ramp_defaults_to_albefs_alpha_at_once():
    ramp = albef_fast.AlphaRamp()
    assert (ramp.alpha, ramp.warmup_steps) == (0.4, 1)
    assert [ramp(s) for s in (0, 1, 2)] == [0.0, 0.4, 0.4]


@pytest.mark.parametrize("alpha,steps,exc,name", [
    (0.4, 0, ValueError, "warmup_steps"), (0.4, -3, ValueError, "warmup_steps"), (0.4, 2.0, TypeError, "warmup_steps"),
    (0.4, True, TypeError, "warmup_steps"), (1.4, 5, ValueError, "alpha"), (-0.1, 5, ValueError, "alpha")])
def test_alpha_ramp_rejects_bad_arguments(alpha, steps, exc, name):
    with pytest.raises(exc, match=name):
        albef_fast.AlphaRamp(alpha, steps)


def test_alpha_ramp_rejects_a_negative_step():
    with pytest.raises(ValueError, match="step"):
        albef_fast.AlphaRamp(0.4, 10)(-1)
    for step in ("3", None, True):
        with pytest.raises(TypeError, match="step: expected a number >= 0"):
            albef_fast.AlphaRamp(0.4, 10)(step)
    assert albef_fast.AlphaRamp(0.4, 10)(2.5) == pytest.approx(0.1)  # a fractional step, as an epoch fraction
