import pytest

from tests.factories import T5_TARGETS, make_inventory, tiny_t5


@pytest.fixture(scope="package")
def inventory(tmp_path_factory):
    """A tiny T5's MHR inventory (H=2), built once: tests that write copy it first."""
    folder = tmp_path_factory.mktemp("inv")
    make_inventory(tiny_t5(), folder, task_type="SEQ_2_SEQ_LM", targets=T5_TARGETS, n_splits=2)
    return folder
