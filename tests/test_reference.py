"""albef_fast.reference (ALBEF's formulation) against the independent float64 oracle."""
import pytest
import torch

from albef_fast import reference
from tests.helpers import make_inputs, max_err, oracle_loss


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("retrieval", [False, True])
@pytest.mark.parametrize("b,q,d", [(5, 37, 24), (7, 3, 8), (4, 0, 16)])
def test_reference_matches_oracle(alpha, retrieval, b, q, d):
    x = make_inputs(b, q, d, torch.float64, retrieval=retrieval)
    args = (x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m, x.image_queue, x.text_queue)
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    feats = [x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()]
    ref = reference.itc_loss(feats[0], feats[1], *args[2:], temp, alpha, x.idx, x.idx_queue)
    grads_ref = torch.autograd.grad(ref, feats + [temp])
    feats_o = [x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()]
    temp_o = temp.detach().clone().requires_grad_()
    orc = oracle_loss(feats_o[0], feats_o[1], *args[2:], temp_o, alpha, x.idx, x.idx_queue)[0]
    grads_orc = torch.autograd.grad(orc, feats_o + [temp_o])
    assert max_err(ref, orc) < 1e-12
    for g_ref, g_orc in zip(grads_ref, grads_orc):
        assert max_err(g_ref, g_orc) < 1e-12


def test_reference_ema_is_albef_formula():
    p_m, p = torch.randn(1000), torch.randn(1000)
    expected = p_m * 0.995 + p * (1.0 - 0.995)
    params_m = [p_m.clone()]
    reference.ema_update_(params_m, [p], 0.995)
    assert torch.equal(params_m[0], expected)
    assert not torch.equal(expected, p_m)


def test_reference_enqueue_wraps_around():
    queue, ptr = torch.zeros(2, 5), torch.tensor([4])
    items = torch.arange(6.0).view(3, 2)  # N=3 rows of D=2
    reference.enqueue_([queue], [items], ptr)
    assert ptr.tolist() == [2]
    assert queue[:, 4].tolist() == [0.0, 1.0]
    assert queue[:, 0].tolist() == [2.0, 3.0] and queue[:, 1].tolist() == [4.0, 5.0]


def test_reference_slice_enqueue_matches_wrapping_one_when_q_is_a_multiple_of_n():
    queues, ptr = [torch.randn(3, 8)], torch.tensor([4])
    expected, ptr_e = [queues[0].clone()], ptr.clone()
    items = [torch.randn(4, 3)]
    reference.enqueue_slices_(queues, items, ptr)
    reference.enqueue_(expected, items, ptr_e)
    assert torch.equal(queues[0], expected[0]) and ptr.item() == ptr_e.item() == 0
