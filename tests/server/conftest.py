import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.factories import save_bundle


@pytest.fixture(scope="package")
def t5_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5-bundle")
    save_bundle(folder, "t5", task_names=["alpha", "beta", "gamma"])
    return folder


def bundle_settings(folder, **overrides) -> Settings:
    values = dict(model=folder / "model", inventory=folder / "inventory", device="cpu", max_input_tokens=64,
                  max_new_tokens=16, default_max_new_tokens=8, max_batch_wait_ms=20)
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="package")
def client(t5_bundle):
    with TestClient(create_app(bundle_settings(t5_bundle))) as test_client:
        yield test_client
