"""MODEL.DEQDET.CUDA_GRAPH: the recorded and replayed DEQ inference equals the eager one (CUDA tests,
run where a GPU is present), and what can be checked without a GPU: the config errors, the constants
made without a host copy, the refusal of CPU tensors."""

import pytest
import torch

from deqdet.modeling.constants import device_constant
from deqdet.modeling.deq.graphs import CUDAGraphCache
from tests.helpers import jiggled, synthetic_batch, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _detections(results):
    instances = [r["instances"] for r in results]
    return [(i.scores, i.pred_boxes.tensor, i.pred_classes) for i in instances]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_device_constant_equals_new_tensor(dtype):
    like = torch.zeros(3, dtype=dtype)
    values = [1000.0, 1333.0, 1.0, 0.1, 2.0 / 3.0]
    assert torch.equal(device_constant(values, like), like.new_tensor(values))
    assert device_constant(values, like).dtype == dtype


def test_cuda_graph_needs_tol_0():
    with pytest.raises(ValueError, match="MODEL.DEQDET.CUDA_GRAPH needs MODEL.DEQDET.TOL 0"):
        tiny_model("MODEL.DEQDET.CUDA_GRAPH", "True", "MODEL.DEQDET.TOL", "0.1")


def test_cuda_graph_cache_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        CUDAGraphCache(lambda x: (x + 1,))(torch.zeros(2))


def test_cuda_graph_is_not_used_on_cpu(monkeypatch):
    """On a CPU the option is ignored: nothing is recorded or replayed, the outputs are the eager ones."""
    monkeypatch.setattr(CUDAGraphCache, "__call__", lambda *a: pytest.fail("a CUDA graph was used on CPU"))
    eager = jiggled(tiny_model("MODEL.DEQDET.MAX_ITERS", "2")).eval()
    graphed = tiny_model("MODEL.DEQDET.MAX_ITERS", "2", "MODEL.DEQDET.CUDA_GRAPH", "True").eval()
    graphed.load_state_dict(eager.state_dict())
    batch = synthetic_batch(2)
    with torch.no_grad():
        expected, actual = eager(batch), graphed(batch)
    for e, a in zip(expected, actual):
        assert int(a["steps"]) == int(e["steps"]) == 3
        torch.testing.assert_close(a["residuals"], e["residuals"], rtol=0, atol=0)
    for e, a in zip(_detections(expected), _detections(actual)):
        for x, y in zip(e, a):
            torch.testing.assert_close(y, x, rtol=0, atol=0)


@cuda
def test_cache_replays_with_new_inputs_and_records_per_shape():
    calls = []

    def fn(x, y):
        calls.append(1)
        return (x @ y).relu(), x.sum(1)

    cache = CUDAGraphCache(fn, capacity=2)
    for shape in [(8, 16), (8, 16), (4, 16), (8, 16), (2, 16)]:
        x, y = torch.randn(*shape, device="cuda"), torch.randn(16, 5, device="cuda")
        out = cache(x, y)
        torch.testing.assert_close(out[0], (x @ y).relu())
        torch.testing.assert_close(out[1], x.sum(1))
    # Two calls (warm-up, recording) per new signature; (8, 16) is recorded once, then dropped
    # (capacity 2) when (2, 16) comes.
    assert len(calls) == 2 * 3 and len(cache.graphs) == 2
    first = cache(x, y)[0]
    cache(torch.randn_like(x), y)
    torch.testing.assert_close(first, (x @ y).relu())  # outputs are copies: a later replay leaves them


@cuda
def test_graphed_deq_inference_equals_eager(monkeypatch):
    recordings, record = [], torch.cuda.graph

    def counted_record(*args, **kwargs):
        recordings.append(1)
        return record(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "graph", counted_record)
    opts = ["MODEL.DEVICE", "cuda", "MODEL.DEQDET.MAX_ITERS", "5"]
    eager = jiggled(tiny_model(*opts)).eval()
    graphed = tiny_model(*opts, "MODEL.DEQDET.CUDA_GRAPH", "True").eval()
    graphed.load_state_dict(eager.state_dict())
    for seed, size in [(0, (96, 128)), (1, (96, 128)), (2, (64, 160)), (3, (96, 128))]:
        batch = synthetic_batch(2, seed=seed, size=size)
        with torch.no_grad():
            expected, actual = eager(batch), graphed(batch)
        for e, a in zip(expected, actual):
            assert int(a["steps"]) == int(e["steps"]) == 6
            torch.testing.assert_close(a["residuals"], e["residuals"], rtol=1e-4, atol=1e-6)
        for (es, eb, ec), (as_, ab, ac) in zip(_detections(expected), _detections(actual)):
            torch.testing.assert_close(as_, es, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ab, eb, rtol=1e-4, atol=1e-3)
            assert torch.equal(ac, ec)
    assert len(recordings) == 2  # one recording per input shape
    assert len(graphed.decoder.inference.graph_cache.graphs) == 2
    assert eager.decoder.inference.graph_cache is None


@cuda
def test_graphed_deq_inference_under_bfloat16_autocast():
    """The decoder's raw outputs (an untrained model's boxes may all be empty after post-processing)."""
    opts = ["MODEL.DEVICE", "cuda", "MODEL.DEQDET.MAX_ITERS", "5"]
    eager = jiggled(tiny_model(*opts)).eval()
    graphed = tiny_model(*opts, "MODEL.DEQDET.CUDA_GRAPH", "True").eval()
    graphed.load_state_dict(eager.state_dict())

    def decoder_inputs(seed):
        images = eager.preprocess_image(synthetic_batch(2, seed=seed))
        return (*eager.queries(images.image_sizes), eager.neck(eager.backbone(images.tensor)))

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        inputs = decoder_inputs(1)
        expected = eager.decoder.predict(*inputs)
        graphed.decoder.predict(*decoder_inputs(0))  # records
        actual = graphed.decoder.predict(*inputs)  # replays
    assert actual["logits"].dtype == expected["logits"].dtype
    for key in ("logits", "boxes", "residuals"):
        assert torch.isfinite(expected[key]).all(), key
        torch.testing.assert_close(actual[key].float(), expected[key].float(), rtol=1e-2, atol=1e-2, msg=key)
    assert torch.equal(actual["steps"], expected["steps"])
