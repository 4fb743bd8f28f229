"""The wrapped layer's rows mode when the layer keeps another dtype than the adapters (T5's wo in float32 under
half precision): the adapters are cast into buffers of the layer that stay where they are (a captured CUDA graph
reads them there), and the result is the per-row LoRA formula."""

import torch
from torch import nn

from server.engine.lora_layer import BatchedLoraLinear


def test_rows_in_another_dtype_reuse_their_buffers_and_compute_each_rows_adapter():
    torch.manual_seed(0)
    layer = BatchedLoraLinear(nn.Linear(8, 6))  # float32, like T5's kept wo
    x = torch.randn(3, 2, 8)
    a_t, b = torch.randn(3, 4, 8).bfloat16(), torch.randn(3, 4, 6).bfloat16()  # Aᵀ (N, r, d_in), B (N, r, d_out)
    layer.set_rows(a_t, b, 0.25)
    first = layer.active.lora_a.data_ptr()
    with torch.inference_mode():
        out = layer(x)
    for row in range(3):
        expected = layer.base(x[row]) + 0.25 * (x[row] @ a_t[row].float().T) @ b[row].float()
        torch.testing.assert_close(out[row], expected)
    layer.set_rows(a_t[:2] * 2, b[:2], 0.25)  # fewer rows, other values: the same buffers
    assert layer.active.lora_a.data_ptr() == first and layer.active.lora_a.shape[0] == 2
    with torch.inference_mode():
        out = layer(x[:2])
    torch.testing.assert_close(out[1], layer.base(x[1]) + 0.25 * (x[1] @ (2 * a_t[1]).float().T) @ b[1].float())
