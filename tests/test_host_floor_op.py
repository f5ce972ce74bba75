"""albef_fast::_host_floor_step (csrc/host_floor.cpp): the C++ host-cost probe of
benchmarks/host_floor.py. Its outputs hold no values; what is checked is the autograd shape a
C++ call path would have: gradients reach exactly the features and the temperature."""
import pytest
import torch

from albef_fast import _extension

pytestmark = pytest.mark.skipif(not _extension.has_ops(), reason="C++ extension not built")


def _inputs(device="cpu", b=5, d=7, q=11):
    feats = [torch.randn(b, d, device=device) for _ in range(4)]
    queues = [torch.randn(d, q, device=device) for _ in range(2)]
    temp = torch.tensor(0.07, device=device, requires_grad=True)
    feats[0].requires_grad_(True)
    feats[1].requires_grad_(True)
    return feats, queues, temp


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("launches", [0, 3])
@pytest.mark.parametrize("packed", [True, False])
def test_gradients_reach_the_features_and_temperature(device, launches, packed):
    (img, txt, img_m, txt_m), (img_q, txt_q), temp = _inputs(device)
    loss = torch.ops.albef_fast._host_floor_step(img, txt, img_m, txt_m, img_q, txt_q, temp, 0.4, launches, packed)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.grad_fn is not None
    # packed, the loss shares an allocation with the other scalars only (16-byte slots), as the step's
    assert loss.untyped_storage().nbytes() == (80 if packed else 4)
    loss.backward()
    assert img.grad.shape == img.shape and txt.grad.shape == txt.shape and temp.grad.shape == ()
    assert img_m.grad is None and img_q.grad is None
    shared = img.grad.untyped_storage().data_ptr() == txt.grad.untyped_storage().data_ptr()
    assert shared == packed and img.grad.data_ptr() % 16 == txt.grad.data_ptr() % 16 == 0


def test_without_gradients_no_graph():
    (img, txt, img_m, txt_m), (img_q, txt_q), temp = _inputs()
    with torch.no_grad():
        loss = torch.ops.albef_fast._host_floor_step(img, txt, img_m, txt_m, img_q, txt_q, temp, 0.4, 1)
    assert loss.grad_fn is None


@pytest.mark.parametrize("launches, name", [(-1, "launches"), ("bad", None)])
def test_bad_arguments_are_refused(launches, name):
    (img, txt, img_m, txt_m), (img_q, txt_q), temp = _inputs()
    expected = ValueError if name else (TypeError, RuntimeError)
    with pytest.raises(expected, match=name):
        torch.ops.albef_fast._host_floor_step(img, txt, img_m, txt_m, img_q, txt_q, temp, 0.4, launches)


def test_a_mismatched_text_feature_is_named():
    (img, txt, img_m, txt_m), (img_q, txt_q), temp = _inputs()
    with pytest.raises(ValueError, match="text_feat"):
        torch.ops.albef_fast._host_floor_step(img, txt[:, :3], img_m, txt_m, img_q, txt_q, temp, 0.4, 0)
