"""Offline behaviour of hub downloads: fail fast, and say how to supply the weights."""

import socket

import pytest
from huggingface_hub import constants

from lseg import LSegError
from lseg.model.hub import hub_access, hub_reachable


@pytest.fixture
def online_mode(monkeypatch):
    """As on a machine without HF_HUB_OFFLINE: the probe decides."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


def test_unreachable_hub_switches_to_offline_for_the_block(online_mode, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert not hub_reachable()
    with (
        pytest.raises(LSegError, match="cannot load weights X: the Hugging Face Hub is unreachable.*HF_HOME"),
        hub_access("weights X"),
    ):
        assert constants.is_offline_mode()  # no 50 s retry loop inside
        raise OSError("not in cache")
    assert constants.HF_HUB_OFFLINE is False  # restored


def test_offline_environment_is_honoured_without_probing(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    hub_reachable.cache_clear()
    assert not hub_reachable()
    hub_reachable.cache_clear()
