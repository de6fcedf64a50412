"""The probe's feature cache (`digit probe --cache-dir`): reused while its key matches, rebuilt otherwise."""

from __future__ import annotations

import json

import numpy as np
import torch

import digit.evaluation.probe as probe
from digit.evaluation.probe import cached_gpt_features, extract_gpt_features, feature_cache_key


def _model():
    from digit.models import build_config
    from digit.models.gpt import GPT

    torch.manual_seed(0)
    return GPT(build_config("tiny", vocab_size=32, grid=(4, 4), n_layers=2, dim=32, n_heads=4)).eval()


def _tokens(n=9, seed=0):
    return np.random.default_rng(seed).integers(0, 32, size=(n, 4, 4))


def test_key_names_what_the_features_depend_on():
    tokens = _tokens()
    key = feature_cache_key("ab" * 32, tokens, [0, 2])
    assert key["layers"] == [0, 2] and key["weights_sha256"] == "ab" * 32 and key["features_version"] == 1
    assert key["tokens_shape"] == [9, 4, 4] and key["tokens_dtype"] == str(tokens.dtype)
    assert len(key["tokens_sha256"]) == 64 and json.loads(json.dumps(key)) == key
    assert feature_cache_key("ab" * 32, tokens.copy(), [0, 2]) == key  # a pure function of the values
    changed = tokens.copy()
    changed[4, 1, 1] = (changed[4, 1, 1] + 1) % 32  # a token directory rewritten in place, same size
    assert feature_cache_key("ab" * 32, changed, [0, 2])["tokens_sha256"] != key["tokens_sha256"]
    assert feature_cache_key("ab" * 32, tokens[1:], [0, 2])["tokens_sha256"] != key["tokens_sha256"]  # another subset
    assert feature_cache_key("ab" * 32, tokens, [0, 1]) != key and feature_cache_key("cd" * 32, tokens, [0, 2]) != key


def test_cache_is_written_reused_and_rebuilt(tmp_path, monkeypatch):
    model, tokens, layers = _model(), _tokens(), [0, 2]
    key = feature_cache_key("0" * 64, tokens, layers)
    direct = extract_gpt_features(model, tokens, layers, batch_size=4)
    a = cached_gpt_features(model, tokens, layers, cache_dir=tmp_path, name="train", key=key, batch_size=4)
    np.testing.assert_array_equal(np.asarray(a), direct)
    assert json.loads((tmp_path / "train_features.json").read_text()) == key
    assert not list(tmp_path.glob(".*tmp"))  # staged, then renamed

    calls = []
    real = probe.extract_gpt_features
    monkeypatch.setattr(probe, "extract_gpt_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    b = cached_gpt_features(model, tokens, layers, cache_dir=tmp_path, name="train", key=key, batch_size=4)
    assert calls == [] and isinstance(b, np.memmap)  # reused from disk
    np.testing.assert_array_equal(np.asarray(b), direct)

    # another key (other weights): extracted again with the model it is given, key rewritten
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    key2 = {**key, "weights_sha256": "1" * 64}
    c = cached_gpt_features(other, tokens, layers, cache_dir=tmp_path, name="train", key=key2, batch_size=4)
    assert calls == [1] and json.loads((tmp_path / "train_features.json").read_text()) == key2
    np.testing.assert_allclose(np.asarray(c), extract_gpt_features(other, tokens, layers, batch_size=4), rtol=1e-6)
    assert not np.allclose(np.asarray(c), direct)

    # a cache whose key file is missing (a killed run) is never trusted
    (tmp_path / "train_features.json").unlink()
    cached_gpt_features(other, tokens, layers, cache_dir=tmp_path, name="train", key=key2, batch_size=4)
    assert calls == [1, 1]


def test_without_a_cache_dir_nothing_is_written(tmp_path, monkeypatch):
    model, tokens = _model(), _tokens(4)
    monkeypatch.chdir(tmp_path)
    feats = cached_gpt_features(model, tokens, [1], cache_dir=None, name="val", key={}, batch_size=2)
    assert feats.shape == (1, 4, 32) and not isinstance(feats, np.memmap) and list(tmp_path.iterdir()) == []
    np.testing.assert_array_equal(feats, extract_gpt_features(model, tokens, [1], batch_size=2))


def test_shape_mismatch_rebuilds(tmp_path):
    model, layers = _model(), [0]
    key = feature_cache_key("0" * 64, _tokens(9), layers)  # reused on purpose for other grids
    cached_gpt_features(model, _tokens(9), layers, cache_dir=tmp_path, name="train", key=key)
    got = cached_gpt_features(model, _tokens(6), layers, cache_dir=tmp_path, name="train", key=key)
    assert got.shape == (1, 6, 32)
    np.testing.assert_allclose(np.asarray(got), extract_gpt_features(model, _tokens(6), layers), rtol=1e-6)
