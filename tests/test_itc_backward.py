"""The one-launch backward of the Triton path (kernels/itc_backward.py) against the aten products.

Under TRITON_INTERPRET=1 on a machine without a GPU (set in conftest), compiled on a GPU.
"""
import pytest
import torch

import albef_fast
from albef_fast import itc_op
from tests.helpers import make_inputs

pytest.importorskip("triton")
from albef_fast.kernels import itc_backward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rounded(product: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp32 product in dtype as the kernel stores it: to nearest even on a GPU; the
    interpreter's fp32 -> bf16 cast truncates (triton/runtime/interpreter.py: cast_impl)."""
    if dtype == torch.bfloat16 and not product.is_cuda:
        product = (product.view(torch.int32) & -65536).view(torch.float32)  # low 16 bits cleared: exact in bf16
    return product.to(dtype)


@pytest.mark.parametrize("shape", [(5, 37), (3, 700), (64, 16)])  # one program, three (BLOCK 1024), exact fit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temp_dtype", [None, torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("g", [1.0, -2.75, 0.3])
def test_scaled_grads_are_the_fp32_products_rounded_once(shape, dtype, temp_dtype, g):
    gen = torch.Generator().manual_seed(sum(shape))
    grad_image = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    grad_text = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    grad_temp, g_loss = torch.tensor(-3.14159, device=DEVICE), torch.tensor(g, device=DEVICE)
    out_image, out_text, out_temp = itc_backward.scale_saved_grads(grad_image, grad_text, grad_temp, g_loss,
                                                                   temp_dtype)
    assert torch.equal(out_image, _rounded(grad_image.float() * g_loss, dtype))
    assert torch.equal(out_text, _rounded(grad_text.float() * g_loss, dtype))
    if temp_dtype is None:
        assert out_temp is None
    else:
        assert out_temp.dtype == temp_dtype and out_temp.shape == ()
        assert torch.equal(out_temp, _rounded(grad_temp * g_loss, temp_dtype))


def _count_fused_calls(monkeypatch):
    """The list that each call of the Triton path's fused backward appends to."""
    calls, fused = [], itc_op.FUSED_BACKWARDS["triton"]

    def counted(*args):
        calls.append(1)
        return fused(*args)

    monkeypatch.setitem(itc_op.FUSED_BACKWARDS, "triton", counted)
    return calls


def _grads(x, temp, grad_out, retrieval):
    """Grads of grad_out * itc_loss (triton backend) for image, text (and T when a tensor)."""
    a, b = x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()
    kw = dict(idx=x.idx, idx_queue=x.idx_queue) if retrieval else {}
    loss = albef_fast.itc_loss(a, b, x.image_feat_m, x.text_feat_m, x.image_queue, x.text_queue, temp, 0.4,
                               backend="triton", precision="highest", **kw)
    inputs = (a, b, temp) if torch.is_tensor(temp) else (a, b)
    return torch.autograd.grad(loss, inputs, grad_outputs=torch.tensor(grad_out, device=a.device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temp_dtype", [None, torch.float32, torch.bfloat16])  # None: temp as a float
# exact products in any dtype: aten on CUDA rounds g to bf16 first, the interpreter truncates (_rounded)
@pytest.mark.parametrize("grad_out", [1.0, -2.0])
def test_loss_backward_takes_one_launch_with_the_aten_values(monkeypatch, dtype, temp_dtype, grad_out):
    x = make_inputs(6, 29, 16, dtype, DEVICE, retrieval=True)
    temp = 0.07 if temp_dtype is None else torch.tensor(0.07, device=DEVICE, dtype=temp_dtype, requires_grad=True)
    calls = _count_fused_calls(monkeypatch)
    got = _grads(x, temp, grad_out, True)
    assert calls == [1]
    monkeypatch.delitem(itc_op.FUSED_BACKWARDS, "triton")  # the aten products
    expected = _grads(x, temp, grad_out, True)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and torch.equal(g, e)


def test_weighted_direction_losses_keep_the_aten_products(monkeypatch):
    """Backward through loss_i2t / loss_t2i (the g_losses path) does not take the fused launch."""
    x = make_inputs(5, 12, 8, torch.float32, DEVICE)
    monkeypatch.setitem(itc_op.FUSED_BACKWARDS, "triton", lambda *a: pytest.fail("fused backward taken"))
    a = x.image_feat.clone().requires_grad_()
    out = albef_fast.itc_loss(a, x.text_feat, x.image_feat_m, x.text_feat_m, x.image_queue, x.text_queue, 0.07, 0.4,
                              backend="triton", precision="highest", return_details=True)
    (out.loss + 0.5 * out.loss_i2t).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_create_graph_keeps_the_aten_products(monkeypatch):
    """A backward that records a graph (create_graph=True: gradient penalties, double backward
    through grad_output) gets the aten products; a plain one right after takes the fused launch."""
    x = make_inputs(5, 12, 8, torch.float32, DEVICE)
    calls = _count_fused_calls(monkeypatch)
    a = x.image_feat.clone().requires_grad_()

    def loss():
        return albef_fast.itc_loss(a, x.text_feat, x.image_feat_m, x.text_feat_m, x.image_queue, x.text_queue, 0.07,
                                   0.4, backend="triton", precision="highest")

    w = torch.tensor(1.5, device=a.device, requires_grad=True)
    (g_a,) = torch.autograd.grad(loss(), a, grad_outputs=w, create_graph=True)
    (d_w,) = torch.autograd.grad(g_a.sum(), w)
    assert calls == []
    (g_1,) = torch.autograd.grad(loss(), a)
    assert calls == [1]
    torch.testing.assert_close(d_w, g_1.sum())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temp_kind", ["float", "tensor"])
def test_second_order_through_the_gradient_raises(backend, temp_kind):
    """A gradient penalty on the features (create_graph=True, then a backward through the
    gradient) raises a named error: the saved gradients are constants to autograd, so the
    penalty's own gradient would otherwise silently lack its second-order term (4.3 off in 5.0
    on these shapes before). The gradients keep the plain backward's values, and d / d
    grad_output stays exact (test_create_graph_keeps_the_aten_products)."""
    x = make_inputs(5, 12, 8, torch.float32, DEVICE)
    a = x.image_feat.clone().requires_grad_()
    temp = torch.tensor(0.07, device=DEVICE, requires_grad=True) if temp_kind == "tensor" else 0.07
    inputs = [a, temp] if temp_kind == "tensor" else [a]

    def loss():
        return albef_fast.itc_loss(a, x.text_feat, x.image_feat_m, x.text_feat_m, x.image_queue, x.text_queue, temp,
                                   0.4, backend=backend, precision="highest")

    plain = torch.autograd.grad(loss(), inputs)
    graphed = torch.autograd.grad(loss(), inputs, create_graph=True)
    for p, g in zip(plain, graphed):
        assert g.requires_grad and torch.equal(p, g)
    for g in graphed:
        with pytest.raises(RuntimeError, match=r"no gradient of its own .*\(second order"):
            torch.autograd.grad(g.sum(), inputs, retain_graph=True)
    with pytest.raises(RuntimeError, match="second order"):
        (loss() + graphed[0].pow(2).sum()).backward()  # a penalty on the features' gradient
