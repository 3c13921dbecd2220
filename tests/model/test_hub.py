"""The Hugging Face Hub: offline failures are fast and say what to do; loading each revision from a
hub cache laid out here; pushing through huggingface_hub (recorded, never sent)."""

import socket
from pathlib import Path

import pytest
import torch
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


# ----------------------------------------------------------------------------- loading from a hub cache
REPO = "someone/lseg-tiny"
MAIN, DEV = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, tiny_model):
    """A Hugging Face cache of REPO: main at commit MAIN (tiny_model), branch dev at DEV (other weights)."""
    from lseg import LSeg

    repo = tmp_path / "cache" / "models--someone--lseg-tiny"
    torch.manual_seed(1)
    other = LSeg.from_config("tiny")
    for commit, model in ((MAIN, tiny_model), (DEV, other)):
        model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "dev").write_text(DEV)
    return tmp_path / "cache", other


def _same_weights(a, b) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_from_pretrained_reads_each_revision_from_the_hub_cache(hub_cache, tiny_model, monkeypatch):
    import huggingface_hub

    from lseg import LSeg

    cache, other = hub_cache
    calls = []
    real = huggingface_hub.hf_hub_download
    monkeypatch.setattr(
        "lseg.model.checkpoint.hf_hub_download", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    main = LSeg.from_pretrained(REPO, cache_dir=cache, local_files_only=True)
    assert _same_weights(main, tiny_model) and main.config == tiny_model.config
    assert calls[-1] == {"revision": None, "cache_dir": cache, "local_files_only": True, "token": None}
    assert _same_weights(LSeg.from_pretrained(REPO, revision="dev", cache_dir=cache), other)  # HF_HUB_OFFLINE
    assert _same_weights(
        LSeg.from_pretrained(REPO, revision=DEV, cache_dir=cache, local_files_only=True), other
    )


def test_missing_revision_is_a_one_line_error(hub_cache):
    from lseg import LSeg

    cache, _ = hub_cache
    with pytest.raises(LSegError, match=f"cannot load model '{REPO}' at revision 'v9'") as error:
        LSeg.from_pretrained(REPO, revision="v9", cache_dir=cache, local_files_only=True)
    assert "\n" not in str(error.value) and "HF_HOME" in str(error.value)


def test_dtype_casts_floating_weights_only(hub_cache):
    from lseg import LSeg

    cache, _ = hub_cache
    model = LSeg.from_pretrained(REPO, cache_dir=cache, dtype="bfloat16")
    dtypes = {t.dtype for t in model.state_dict().values()}
    assert dtypes == {torch.bfloat16, torch.int64}  # BatchNorm's num_batches_tracked stays an integer
    assert model.dtype == torch.bfloat16
    assert LSeg.from_pretrained(REPO, cache_dir=cache, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(LSegError, match="dtype must be one of auto, float32, bfloat16, float16"):
        LSeg.from_pretrained(REPO, cache_dir=cache, dtype="int8")


# ----------------------------------------------------------------------------- push_to_hub
@pytest.fixture
def fake_hub(monkeypatch):
    """An online, reachable hub whose HfApi methods only record what they were given."""
    from huggingface_hub import HfApi, ModelCard

    import lseg.model.hub as hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    calls = []

    def record(name):
        def method(self, *args, **kwargs):
            if name == "upload_folder":
                folder = kwargs["folder_path"]
                kwargs["files"] = sorted(p.name for p in Path(folder).iterdir())
                kwargs["card"] = ModelCard.load(Path(folder) / "README.md").data
            calls.append((name, args, kwargs))
            return f"commit of {args or kwargs['repo_id']}"

        return method

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, record(name))
    return calls


def test_push_to_hub_uploads_the_saved_folder_as_one_commit(fake_hub, tiny_model):
    result = tiny_model.push_to_hub(
        "me/lseg-tiny", private=True, commit_message="first", revision="dev", card_data={"license": "other"}
    )
    assert result == "commit of me/lseg-tiny"
    (create, args, options), (branch, branch_args, branch_options), (upload, _, upload_options) = fake_hub
    assert (create, args, options) == ("create_repo", ("me/lseg-tiny",), {"private": True, "exist_ok": True})
    assert (branch, branch_args, branch_options) == (
        "create_branch", ("me/lseg-tiny",), {"branch": "dev", "exist_ok": True}
    )  # fmt: skip
    assert upload == "upload_folder" and upload_options["files"] == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert upload_options["repo_id"] == "me/lseg-tiny" and upload_options["revision"] == "dev"
    assert upload_options["commit_message"] == "first"
    card = upload_options["card"]
    assert card.model_name == "me/lseg-tiny" and card.license == "other" and card.library_name == "lseg"
    assert not Path(upload_options["folder_path"]).exists()  # the temporary folder is gone


def test_push_to_hub_without_a_revision_makes_no_branch(fake_hub, tiny_model):
    tiny_model.push_to_hub("me/lseg-tiny")
    assert [name for name, *_ in fake_hub] == ["create_repo", "upload_folder"]


def test_push_to_hub_offline_or_refused_fails_at_once_in_one_line(monkeypatch, tiny_model, fake_hub):
    from huggingface_hub import HfApi

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LSegError, match="cannot push to me/x: HF_HUB_OFFLINE is set"):
        tiny_model.push_to_hub("me/x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("lseg.model.hub.hub_reachable", lambda: False)
    with pytest.raises(LSegError, match="cannot push to me/x: the Hugging Face Hub is unreachable"):
        tiny_model.push_to_hub("me/x")
    assert fake_hub == []
    monkeypatch.setattr("lseg.model.hub.hub_reachable", lambda: True)

    def refuse(self, *args, **kwargs):
        raise OSError("401 Client Error: Unauthorized for url\nmore detail")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(LSegError, match="cannot push to me/x: 401 Client Error.*hf auth login") as error:
        tiny_model.push_to_hub("me/x")
    assert "\n" not in str(error.value)
