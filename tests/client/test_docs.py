"""Every public method of Client and AsyncClient (and the constructor) documents each of its parameters."""

import inspect
import re

import pytest

from client import AsyncClient, Client


def public_methods(cls):
    names = sorted(name for name, value in vars(cls).items() if callable(value) and not name.startswith("_"))
    return ["__init__", *names]


METHODS = [(cls, name) for cls in (Client, AsyncClient) for name in public_methods(cls)]


@pytest.mark.parametrize(("cls", "name"), METHODS, ids=[f"{cls.__name__}.{name}" for cls, name in METHODS])
def test_public_method_documents_each_parameter(cls, name):
    method = getattr(cls, name)
    doc = inspect.getdoc(method) or ""
    assert doc.strip(), f"{cls.__name__}.{name} has no docstring"
    parameters = [p for p in inspect.signature(method).parameters if p != "self"]
    undocumented = [p for p in parameters if not re.search(rf"^\s+{p}: \S", doc, re.MULTILINE)]
    assert not undocumented, f"{cls.__name__}.{name} does not document {undocumented}"
    if parameters:
        assert "Args:" in doc, f"{cls.__name__}.{name}: parameters go in an Args: section"


def test_twins_share_their_documentation():
    pairs = [(name, "aclose" if name == "close" else name) for name in public_methods(Client)]
    assert sorted(async_name for _, async_name in pairs) == sorted(public_methods(AsyncClient))
    for name, async_name in pairs:
        assert inspect.getdoc(getattr(Client, name)) == inspect.getdoc(getattr(AsyncClient, async_name)), name
