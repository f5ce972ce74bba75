"""CUDA-only checks of the state ops and of a whole step under CUDA-graph capture (skip without a GPU)."""
import pytest
import torch

import albef_fast
from albef_fast import _extension, reference
from tests.helpers import check_ema_layouts, make_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HAS_CUDA_OPS = _extension.has_ops() and _extension.build_info().get("cuda", False)


@pytest.mark.skipif(not HAS_CUDA_OPS, reason="extension built without CUDA")
@pytest.mark.parametrize("momentum", [0.995, 0.3333])
def test_ema_bit_exact_on_cuda(momentum):
    shapes = [(7,), (3, 5), (1,), (129, 33), (1000, 4), (4099,)]
    params = [torch.randn(s, device="cuda") for s in shapes]
    params_m = [torch.randn(s, device="cuda") for s in shapes]
    params_m.append(torch.randn(64, device="cuda")[1:])  # misaligned storage: the scalar path
    params.append(torch.randn(63, device="cuda"))
    expected = [p.clone() for p in params_m]
    reference.ema_update_(expected, params, momentum)
    albef_fast.ema_update_(params_m, params, momentum)
    for got, exp in zip(params_m, expected):
        assert torch.equal(got, exp)


@pytest.mark.skipif(not HAS_CUDA_OPS, reason="extension built without CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ema_half_on_cuda_rounds_once(dtype):
    p, p_m = torch.randn(5000, device="cuda").to(dtype), torch.randn(5000, device="cuda").to(dtype)
    expected = (p_m.float() * 0.995 + p.float() * (1 - 0.995)).to(dtype)
    albef_fast.ema_update_([p_m], [p], 0.995)
    assert torch.equal(p_m, expected)


@pytest.mark.skipif(not HAS_CUDA_OPS, reason="extension built without CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_any_layout_on_cuda(dtype):
    check_ema_layouts(dtype, "cuda")


@pytest.mark.skipif(not HAS_CUDA_OPS, reason="extension built without CUDA")
def test_ema_rejects_a_cpu_pair_among_cuda_ones_before_any_write():
    """Every pair is checked before the op writes any (strided pairs go one at a time, first); a
    RuntimeError until session 27, a ValueError naming the pair now."""
    strided = torch.zeros(3, 2, device="cuda").t()
    with pytest.raises(ValueError, match=r"params_m\[1\]: expected a tensor on a cuda device"):
        albef_fast.ema_update_([strided, torch.zeros(4)], [torch.ones(2, 3, device="cuda"), torch.ones(4)], 0.5)
    assert not strided.any()


@pytest.mark.skipif(not HAS_CUDA_OPS or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ema_updates_pairs_on_two_gpus_in_one_call():
    """A model split over two GPUs: one launch per (device, dtype) group, each on its device
    (until session 27 the op raised at the first pair off params_m[0]'s GPU, the strided pairs before it
    written)."""
    params_m = [torch.randn(1000, device=f"cuda:{k}") for k in (0, 1, 0)] + [torch.randn(4, 3, device="cuda:1").t()]
    params = [torch.randn_like(p) for p in params_m]
    expected = [p.clone() for p in params_m]
    reference.ema_update_(expected, params, 0.995)
    albef_fast.ema_update_(params_m, params, 0.995)
    assert all(torch.equal(got, exp) for got, exp in zip(params_m, expected))


@pytest.mark.parametrize("q,n,start", [(10, 3, 8), (10, 10, 4), (65536, 64, 65500)])
def test_enqueue_on_cuda_matches_reference(q, n, start):
    queues = [torch.randn(4, q, device="cuda"), torch.randn(3, q, device="cuda").bfloat16(),
              torch.full((1, q), -100, device="cuda")]
    items = [torch.randn(n, 4, device="cuda"), torch.randn(n, 3, device="cuda"), torch.arange(n, device="cuda")[:, None]]
    expected = [x.clone() for x in queues]
    ptr, ptr_ref = torch.tensor([start], device="cuda"), torch.tensor([start], device="cuda")
    reference.enqueue_(expected, items, ptr_ref)
    albef_fast.enqueue_(queues, items, ptr)
    assert ptr.item() == ptr_ref.item() == (start + n) % q
    for got, exp in zip(queues, expected):
        assert torch.equal(got, exp)


def test_enqueue_on_cuda_takes_more_queues_than_one_launch_writes():
    """11 queues: the op writes 8 a launch (csrc/cuda/enqueue.cu), then advances ptr once."""
    q, n, start = 12, 5, 9
    queues = [torch.randn(k + 1, q, device="cuda").to(torch.bfloat16 if k % 3 else torch.float32) for k in range(10)]
    queues.append(torch.full((1, q), -100, device="cuda"))
    items = [torch.randn(n, queue.shape[0], device="cuda") for queue in queues[:-1]]
    items.append(torch.arange(n, device="cuda")[:, None])
    expected = [x.clone() for x in queues]
    ptr, ptr_ref = torch.tensor([start], device="cuda"), torch.tensor([start], device="cuda")
    reference.enqueue_(expected, items, ptr_ref)
    albef_fast.enqueue_(queues, items, ptr)
    assert ptr.item() == ptr_ref.item() == (start + n) % q
    assert all(torch.equal(got, exp) for got, exp in zip(queues, expected))


@pytest.mark.skipif(not HAS_CUDA_OPS, reason="extension built without CUDA")
def test_ema_replays_from_a_cuda_graph_after_pinned_memory_is_reused():
    """The op copies its pointer table to the device from pinned memory, a copy the graph repeats
    at every replay: pinned tensors allocated and overwritten after the capture (a DataLoader's
    batches) must not change what the replays update (csrc/cuda/ema.cu: keep_while_captured;
    torch before pytorch#161583 recycled the freed block)."""
    params = [torch.randn(1000, device="cuda"), torch.randn(3, 5, device="cuda")]
    params_m = [torch.zeros_like(p) for p in params]
    expected = [p.clone() for p in params_m]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        albef_fast.ema_update_(params_m, params, 0.5)  # warm up
    torch.cuda.current_stream().wait_stream(side)
    reference.ema_update_(expected, params, 0.5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        albef_fast.ema_update_(params_m, params, 0.5)
    # pinned blocks that may be the table's, freed after the capture: written with 255s
    pinned = [torch.full((n,), 255, dtype=torch.uint8).pin_memory() for n in (80, 128, 512, 4096) for _ in range(8)]
    for _ in range(3):
        graph.replay()
        reference.ema_update_(expected, params, 0.5)
    torch.cuda.synchronize()
    del pinned
    assert all(torch.equal(got, exp) for got, exp in zip(params_m, expected))


def test_training_step_captures_in_a_cuda_graph():
    """EMA, loss (Triton forward + backward) and enqueue replay from a CUDA graph: no host sync."""
    torch.manual_seed(0)
    enc, enc_m = torch.nn.Linear(64, 64).cuda(), torch.nn.Linear(64, 64).cuda()
    module = albef_fast.ITCLoss(embed_dim=64, queue_size=256).cuda()
    updater = albef_fast.MomentumUpdater([(enc, enc_m)], momentum=0.9)
    updater.copy_params()
    image, text = torch.randn(32, 64, device="cuda"), torch.randn(32, 64, device="cuda")
    norm = torch.nn.functional.normalize

    def step():
        updater.update()
        with torch.no_grad():
            feat_m, text_m = norm(enc_m(image), dim=-1), norm(enc_m(text), dim=-1)
        out = module(norm(enc(image), dim=-1), norm(enc(text), dim=-1), feat_m, text_m)
        out.loss.backward()
        return out.loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up: autotune, allocator
            step()
    torch.cuda.current_stream().wait_stream(side)
    ptr_before = module.queue_ptr.item()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert module.queue_ptr.item() == (ptr_before + 5 * 32) % 256  # capture records only; 5 replays run
    assert torch.isfinite(loss).item()


def test_eager_matches_on_cuda_default_precision():
    x = make_inputs(64, 4096, 256, torch.float32, "cuda")
    args = (x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m, x.image_queue, x.text_queue)
    torch.testing.assert_close(albef_fast.itc_loss(*args, 0.07), reference.itc_loss(*args, 0.07), rtol=1e-5, atol=1e-5)
