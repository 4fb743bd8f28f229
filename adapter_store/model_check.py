"""Check an inventory against the model it will adapt: every module exists, is a linear layer, and
its shape matches what the skills expect (H must divide d_in and d_out)."""

from __future__ import annotations

from torch import nn

from .errors import InventoryError
from .inventory import WEIGHTS_FILE, Inventory


def check_model(inventory: Inventory, model: nn.Module) -> None:
    path = inventory.folder / WEIGHTS_FILE
    heads = inventory.config.n_splits
    modules = dict(model.named_modules())
    for name, (d_in, d_out) in inventory.module_shapes.items():
        layer = modules.get(name)
        if layer is None:
            raise InventoryError(path, "the model has no module of this name", key=name)
        if not isinstance(layer, nn.Linear):
            raise InventoryError(path, f"the model's module is a {type(layer).__name__}, not nn.Linear", key=name)
        for what, size in (("in_features", layer.in_features), ("out_features", layer.out_features)):
            if size % heads:
                raise InventoryError(path, f"H={heads} heads do not divide the layer's {what}={size}", key=name)
        if (layer.in_features, layer.out_features) != (d_in, d_out):
            raise InventoryError(
                path, f"skills expect a linear layer {d_in}->{d_out}, the model's is "
                f"{layer.in_features}->{layer.out_features}", key=name)
