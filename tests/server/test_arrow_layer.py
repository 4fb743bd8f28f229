"""Arrow in a wrapped layer: per-token routing against a dense reference, PEFT's Arrow layer, and a token that
picks one expert with top_k = 1 (then the layer is that expert's plain LoRA)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from adapter_store.arrow import top_input_directions
from server.engine.arrow_layer import ArrowRows, ArrowWeights, RoutingRecorder, arrow_delta
from server.engine.lora_layer import Active, BatchedLoraLinear

D_IN, D_OUT, RANK, EXPERTS = 12, 10, 2, 5


@pytest.fixture
def library():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(EXPERTS, D_IN, RANK, generator=gen)
    b = torch.randn(EXPERTS, RANK, D_OUT, generator=gen)
    return top_input_directions(a, b), a, b


def dense_reference(x, p, a, b, top_k, temperature):
    """Token by token, expert by expert, as the paper writes it."""
    out = torch.zeros(x.shape[0], D_OUT)
    for t in range(x.shape[0]):
        sims = torch.tensor([abs(float(x[t] @ p[j])) for j in range(EXPERTS)])
        keep = sims.topk(top_k).indices.tolist()
        z = torch.tensor([sims[j] / temperature for j in keep])
        w = torch.softmax(z, dim=0)
        for wj, j in zip(w, keep, strict=True):
            out[t] += wj * (x[t] @ a[j] @ b[j]) / RANK
    return out


@pytest.mark.parametrize(("top_k", "temperature"), [(1, 1.0), (2, 0.5), (4, 2.0), (EXPERTS, 1.0)])
def test_delta_equals_the_dense_reference(library, top_k, temperature):
    p, a, b = library
    x = torch.randn(7, D_IN)
    delta, w = arrow_delta(x, ArrowWeights.of(p, a, b, 1.0 / RANK, temperature), top_k)
    assert torch.allclose(delta, dense_reference(x, p, a, b, top_k, temperature), atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(7)) and int((w > 0).sum(-1).max()) == top_k


def test_delta_equals_peft_arrow(library):
    """PEFT's ArrowLoraLinearLayer (tuners/lora/arrow.py) with our prototypes: the same delta."""
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    p, a, b = library
    config = SimpleNamespace(top_k=2, router_temperature=0.7, rng_seed=0, use_gks=False, gks_adapter_names=[],
                             task_adapter_names=[f"task_{j}" for j in range(EXPERTS)])
    peft_layer = ArrowLoraLinearLayer(D_IN, config)
    lora_a = {f"task_{j}": nn.Linear(D_IN, RANK, bias=False) for j in range(EXPERTS)}
    lora_b = {f"task_{j}": nn.Linear(RANK, D_OUT, bias=False) for j in range(EXPERTS)}
    with torch.no_grad():
        for j in range(EXPERTS):
            lora_a[f"task_{j}"].weight.copy_(a[j].T)  # PEFT: A (r, in), B (out, r)
            lora_b[f"task_{j}"].weight.copy_(b[j].T)
    peft_layer.build_prototypes(lora_a, lora_b)
    # PEFT's power iteration (15 steps: not fully converged where the top two singular values are close) finds
    # the same input-side directions, up to sign, as our QR + SVD
    assert torch.allclose((peft_layer.prototypes * p).sum(-1).abs(), torch.ones(EXPERTS), atol=1e-2)
    peft_layer.prototypes = p.clone()  # then compare the forward exactly
    x = torch.randn(2, 3, D_IN)
    scaling = {f"task_{j}": 1.0 / RANK for j in range(EXPERTS)}
    expected = peft_layer.forward(x, lora_a, lora_b, nn.Identity(), scaling)
    delta, _ = arrow_delta(x, ArrowWeights.of(p, a, b, 1.0 / RANK, 0.7), 2)
    assert torch.allclose(delta, expected, atol=1e-5)


def wrapped():
    torch.manual_seed(0)
    return BatchedLoraLinear(nn.Linear(D_IN, D_OUT))


def test_top_1_on_an_experts_prototype_is_that_experts_plain_lora(library):
    p, a, b = library
    layer = wrapped()
    weights = ArrowWeights.of(p, a, b, 1.0 / RANK)
    layer.active = Active(arrow=[ArrowRows(weights, 1)])
    for j in range(EXPERTS):
        x = (3.0 * p[j]).view(1, 1, D_IN)  # |x·p_j| = 3 beats |x·p_i| < 3 for any other unit p_i
        assert int(((x[0] @ p.T).abs()).argmax()) == j
        expected = layer.base(x) + x @ a[j] @ b[j] / RANK
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_arrow_rows_beside_plain_rows(library):
    """Row 0 runs its own LoRA (rows mode), row 1 Arrow (and a zero LoRA): each as if alone."""
    p, a, b = library
    layer = wrapped()
    weights = ArrowWeights.of(p, a, b, 1.0 / RANK)
    own_a, own_b = torch.randn(D_IN, RANK), torch.randn(RANK, D_OUT)
    x = torch.randn(2, 4, D_IN)
    layer.set_rows(torch.stack([own_a.t(), torch.zeros(RANK, D_IN)]), torch.stack([own_b, torch.zeros(RANK, D_OUT)]),
                   1.0 / RANK)  # rows mode takes Aᵀ
    recorder = RoutingRecorder(torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    layer.active.arrow = [ArrowRows(weights, 3, rows=[1], name="l", recorder=recorder)]
    out = layer(x)
    assert torch.allclose(out[0], layer.base(x[0]) + x[0] @ own_a @ own_b / RANK, atol=1e-5)
    assert torch.allclose(out[1], layer.base(x[1]) + dense_reference(x[1], p, a, b, 3, 1.0), atol=1e-5)
    _, w = arrow_delta(x[1, :2], weights, 3)  # the recorder averages the row's real tokens only
    assert torch.allclose(recorder.average(1), w.mean(0), atol=1e-6) and recorder.average(0) is None
