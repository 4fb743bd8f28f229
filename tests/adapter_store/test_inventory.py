"""Reading inventories: valid ones load; each kind of bad one stops with a message naming file and key."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_store import AdapterStore, Inventory, InventoryError, check_model
from tests.factories import T5_TARGETS, make_inventory, tiny_t5

Q0 = "base_model.model.encoder.block.0.layer.0.SelfAttention.q"
WEIGHTS = "adapter_model.safetensors"
EXTRA = torch.zeros(1)


@pytest.fixture(scope="module")
def good_inventory(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inventory")
    make_inventory(tiny_t5(), folder, task_type="SEQ_2_SEQ_LM", targets=T5_TARGETS, n_splits=2,
                   task_names=["alpha", "beta", "gamma"])
    return folder


@pytest.fixture
def inventory_copy(good_inventory, tmp_path):
    folder = tmp_path / "inv"
    shutil.copytree(good_inventory, folder)
    return folder


def test_reads_every_module_grouped_by_shape(good_inventory):
    inventory = Inventory.read(good_inventory)
    assert inventory.config.n_splits == 2 and inventory.config.n_skills == 4 and inventory.config.r == 2
    assert len(inventory.module_names) == 2 * (6 + 10)  # 2 blocks; enc: 4 attn + wi + wo, dec: 8 attn + wi + wo
    shapes = inventory.module_shapes
    assert shapes["encoder.block.0.layer.0.SelfAttention.q"] == (32, 32)
    assert shapes["decoder.block.1.layer.2.DenseReluDense.wi"] == (32, 64)
    assert {group.lora_a.shape[:3:2] for group in inventory.groups} == {(4, 2)}  # (K, L, H, ...)
    assert len(inventory.fingerprint) == 16


def test_check_model_accepts_the_matching_model(good_inventory):
    check_model(Inventory.read(good_inventory), tiny_t5())


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)


def _truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _corrupt_header(folder):
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[8:40] = b"\xff" * 32
    (folder / WEIGHTS).write_bytes(bytes(data))


def _set_nan(tensors):
    tensors[Q0 + ".poly_lora_B"][0, 0, 0, 0] = float("nan")


BAD_INVENTORIES = [
    ("missing config", lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json", "file not found"),
    ("missing weights", lambda f: (f / WEIGHTS).unlink(), WEIGHTS, "file not found"),
    ("wrong peft_type", lambda f: _edit_config(f, peft_type="LORA"), "adapter_config.json", "peft_type"),
    ("bad r", lambda f: _edit_config(f, r=0), "adapter_config.json", "'r'"),
    ("missing key", lambda f: _edit_tensors(f, lambda t: t.pop(Q0 + ".poly_router.module_logits")),
     WEIGHTS, "poly_router.module_logits"),
    ("wrong shape", lambda f: _edit_tensors(f, lambda t: t.update({Q0 + ".poly_lora_A": torch.zeros(2, 4, 16, 3)})),
     WEIGHTS, "expected shape (2, 4, 16, 2), found (2, 4, 16, 3)"),
    ("config disagrees with tensors", lambda f: _edit_config(f, n_skills=5), WEIGHTS, "expected shape"),
    ("unexpected key", lambda f: _edit_tensors(f, lambda t: t.update({"base_model.model.x.lora_A.weight": EXTRA})),
     WEIGHTS, "unexpected key"),
    ("nan", lambda f: _edit_tensors(f, _set_nan), WEIGHTS, "NaN"),
    ("truncated bytes", _truncate, WEIGHTS, "cannot read safetensors"),
    ("corrupt header", _corrupt_header, WEIGHTS, "cannot read safetensors"),
    ("tasks.json row out of range", lambda f: (f / "tasks.json").write_text('{"a": 0, "b": 7}'), "tasks.json",
     "row 7 does not exist"),
    ("tasks.json duplicate row", lambda f: (f / "tasks.json").write_text('{"a": 1, "b": 1}'), "tasks.json",
     "already named"),
    ("tasks.json bad name", lambda f: (f / "tasks.json").write_text('{"../evil": 0}'), "tasks.json",
     "invalid task name"),
    ("tasks.json not json", lambda f: (f / "tasks.json").write_text("{"), "tasks.json", "not valid JSON"),
]


@pytest.mark.parametrize("damage,file,message", [c[1:] for c in BAD_INVENTORIES], ids=[c[0] for c in BAD_INVENTORIES])
def test_bad_inventory_is_refused_with_file_and_key(inventory_copy, damage, file, message):
    damage(inventory_copy)
    with pytest.raises(InventoryError) as caught:
        AdapterStore.open(inventory_copy)
    assert file in caught.value.file
    assert message in str(caught.value)


def test_missing_key_error_names_the_key(inventory_copy):
    _edit_tensors(inventory_copy, lambda t: t.pop(Q0 + ".poly_lora_B"))
    with pytest.raises(InventoryError) as caught:
        Inventory.read(inventory_copy)
    assert caught.value.key == Q0 + ".poly_lora_B"


def test_heads_not_dividing_a_layer_is_refused_against_the_model(tmp_path):
    make_inventory(tiny_t5(), tmp_path, task_type="SEQ_2_SEQ_LM", targets=["q"], n_splits=3)  # 32 % 3 != 0
    inventory = Inventory.read(tmp_path)
    with pytest.raises(InventoryError, match="H=3 heads do not divide the layer's in_features=32") as caught:
        check_model(inventory, tiny_t5())
    assert caught.value.key.endswith("SelfAttention.q")


def test_model_without_the_module_is_refused(good_inventory):
    model = tiny_t5()
    model.encoder.block[0].layer[0].SelfAttention.q = torch.nn.Identity()
    with pytest.raises(InventoryError, match="not nn.Linear"):
        check_model(Inventory.read(good_inventory), model)


def test_model_of_another_width_is_refused(good_inventory):
    with pytest.raises(InventoryError, match="skills expect a linear layer 32->32"):
        check_model(Inventory.read(good_inventory), tiny_t5(d_model=64))
