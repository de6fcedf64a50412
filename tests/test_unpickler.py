"""The restricted unpickler: config objects and tensors come back as plain data; code-running pickles are refused and
their payload never runs."""

from __future__ import annotations

import argparse
import enum
import os
import re
import subprocess
import sys
import types
import typing
from collections import OrderedDict

import pytest
import torch

from digit.convert.unpickler import load_checkpoint, restricted_load
from digit.errors import DigitError


class _System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


class _Popen:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.marker],))


@pytest.mark.parametrize("payload, name", [(_System, "system"), (_Eval, "builtins.eval"), (_Popen, "subprocess.Popen")])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, payload, name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "cfg": {"x": payload(marker)}}, path)
    with pytest.raises(DigitError, match=name) as err:
        load_checkpoint(path)
    assert "refusing to unpickle global" in str(err.value)
    assert not marker.exists()  # the payload never ran


def test_converter_refuses_malicious_checkpoint(tmp_path):
    from digit.convert.digit import convert_digit

    marker = tmp_path / "pwned"
    torch.save({"args": None, "cfg": {"model": {"_name": "stlm"}}, "model": {"w": _System(marker)}}, tmp_path / "e.pt")
    with pytest.raises(DigitError, match="refusing to unpickle global (posix|os).system"):
        convert_digit(tmp_path / "o", stage1=str(tmp_path / "e.pt"))
    assert not marker.exists() and not (tmp_path / "o" / "stage1").exists()


def test_storage_from_bytes_is_refused(tmp_path):
    # torch.storage._load_from_bytes would call torch.load(weights_only=False) on embedded bytes
    import pickle

    class _FromBytes:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (b"x",))

    path = tmp_path / "f.pt"
    with open(path, "wb") as f:
        pickle.dump({"a": _FromBytes()}, f)
    with pytest.raises(DigitError):
        restricted_load(path)


@pytest.fixture
def fake_omegaconf():
    """Minimal stand-ins with omegaconf's pickled structure (containers keep ``_content``, nodes ``_val``), registered
    as the real module names only while pickling: the loader must rebuild them without importing anything."""
    names = ["omegaconf", "omegaconf.dictconfig", "omegaconf.listconfig", "omegaconf.nodes", "omegaconf.base",
             "fairseq", "fairseq.dataclass", "fairseq.dataclass.configs", "fairseq.dataclass.constants"]  # fmt: skip
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}

    class Metadata:
        def __init__(self, ref_type, key=None):
            self.ref_type, self.key, self.flags = ref_type, key, {}

    class Node:
        def __getstate__(self):
            return dict(self.__dict__)

    class DictConfig(Node):
        def __init__(self, content):
            self._metadata, self._parent, self._content = Metadata(dict), None, content

    class ListConfig(Node):
        def __init__(self, content):
            self._metadata, self._parent, self._content = Metadata(list), None, content

    class AnyNode(Node):
        def __init__(self, val):
            self._metadata, self._parent, self._val = Metadata(typing_any), None, val

    class CommonConfig:  # a fairseq dataclass
        def __init__(self):
            self.fp16, self.seed, self._hidden = True, 1, "x"

    class DDP_BACKEND_CHOICES(enum.Enum):  # fairseq ChoiceEnum
        c10d = "c10d"

    typing_any = typing.Any
    for cls, mod in ((Metadata, "omegaconf.base"), (DictConfig, "omegaconf.dictconfig"),
                     (ListConfig, "omegaconf.listconfig"), (AnyNode, "omegaconf.nodes"),
                     (CommonConfig, "fairseq.dataclass.configs"),
                     (DDP_BACKEND_CHOICES, "fairseq.dataclass.constants")):  # fmt: skip
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    sys.modules.update(mods)
    yield types.SimpleNamespace(DictConfig=DictConfig, ListConfig=ListConfig, AnyNode=AnyNode,
                                CommonConfig=CommonConfig, Backend=DDP_BACKEND_CHOICES)  # fmt: skip
    for n, m in saved.items():
        if m is None:
            sys.modules.pop(n, None)
        else:
            sys.modules[n] = m


def test_omegaconf_config_becomes_plain_dicts(tmp_path, fake_omegaconf):
    oc = fake_omegaconf
    model = oc.DictConfig({"_name": oc.AnyNode("stlm"), "decoder_layers": oc.AnyNode(16),
                           "pretrained_enc_config": oc.DictConfig({"layer": oc.AnyNode(3)}),
                           "lr": oc.ListConfig([oc.AnyNode(3e-4)]), "missing": oc.DictConfig("???")})  # fmt: skip
    common = oc.CommonConfig()
    ck = {"args": None, "cfg": oc.DictConfig({"model": model}), "model": {"w": torch.arange(4.0).half()},
          "extra_state": OrderedDict(epoch=3), "common": common, "backend": oc.Backend.c10d}  # fmt: skip
    path = tmp_path / "ck.pt"
    torch.save(ck, path)
    for n in [n for n in sys.modules if n.startswith(("omegaconf", "fairseq"))]:
        sys.modules.pop(n)  # as on a machine without omegaconf and fairseq
    out = load_checkpoint(path)
    assert out["cfg"] == {"model": {"_name": "stlm", "decoder_layers": 16, "pretrained_enc_config": {"layer": 3},
                                    "lr": [3e-4], "missing": None}}  # fmt: skip
    assert out["model"]["w"].dtype == torch.float16 and out["model"]["w"].tolist() == [0, 1, 2, 3]
    assert out["extra_state"] == {"epoch": 3}
    assert out["common"] == {"fp16": True, "seed": 1} and out["backend"] == "c10d"  # dataclass fields, enum value
    assert "omegaconf" not in sys.modules and "fairseq" not in sys.modules


def test_namespace_and_tensors_load_through_weights_only(tmp_path):
    args = argparse.Namespace(gpt_model="GPT-B", image_size=256)
    torch.save({"model": {"w": torch.ones(3)}, "args": args, "steps": 5}, tmp_path / "c.pt")
    out = load_checkpoint(tmp_path / "c.pt")
    assert out["args"].gpt_model == "GPT-B" and out["steps"] == 5 and out["model"]["w"].sum() == 3


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(DigitError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(DigitError):
        load_checkpoint(tmp_path / "junk.pt")


def test_numpy_values_in_extra_state(tmp_path):
    import numpy as np

    # fairseq meters / best-loss values are numpy scalars: weights_only refuses them, the restricted loader does not
    torch.save(
        {"model": {"w": torch.ones(1)}, "extra_state": {"best": np.float64(1.5), "ids": np.arange(3)}},
        tmp_path / "n.pt",
    )
    out = load_checkpoint(tmp_path / "n.pt")
    assert out["extra_state"]["best"] == 1.5 and out["extra_state"]["ids"].tolist() == [0, 1, 2]
    torch.save({"x": np.array([object()], dtype=object)}, tmp_path / "o.pt")  # object arrays are refused
    with pytest.raises(DigitError):
        load_checkpoint(tmp_path / "o.pt")


def _assert_clean_refusal(message: str, *names: str) -> None:
    """One line, no ANSI escapes, none of torch's advice to retry without the weights-only guard."""
    assert "\n" not in message and "\x1b" not in message, repr(message)
    advice = re.sub(r"/\S+", "", message)  # paths (the test's tmp dir) aside
    assert "weights_only" not in advice and "False" not in advice and "trusted source" not in advice, message
    for name in names:
        assert name in message, message


@pytest.mark.parametrize(
    "payload, names",
    [
        (lambda m: _System(m), ("system",)),  # a blocked module (posix.system)
        (lambda m: __import__("fractions").Fraction(1, 3), ("fractions.Fraction",)),  # an unlisted class (ANSI text)
    ],
)
def test_weights_only_refusal_names_the_global_in_one_clean_line(tmp_path, payload, names):
    from digit.utils.safe_pickle import load_weights

    marker = tmp_path / "pwned"
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2), "x": payload(marker)}, path)
    with pytest.raises(DigitError) as err:
        load_weights(path)
    _assert_clean_refusal(str(err.value), str(path), *names)
    assert not marker.exists()


def test_garbage_file_refusal_is_one_clean_line(tmp_path):
    from digit.utils.safe_pickle import load_weights

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    for load in (load_weights, restricted_load, load_checkpoint):
        with pytest.raises(DigitError) as err:
            load(tmp_path / "junk.pt")
        _assert_clean_refusal(str(err.value), str(tmp_path / "junk.pt"))


def test_cli_refusal_of_a_pickled_encoder_file(tmp_path, capsys):
    from digit.cli import main

    marker = tmp_path / "pwned"
    torch.save({"model": {"pos_embed": torch.zeros(1, 2, 4)}, "cfg": _System(marker)}, tmp_path / "enc.pth")
    import numpy as np

    np.save(tmp_path / "km.npy", np.zeros((4, 64), dtype=np.float32))
    argv = ["tokenizer", "from-centroids", "--centroids", str(tmp_path / "km.npy"), "--encoder",
            "vit_small_patch14_reg4_dinov2", "--encoder-weights", str(tmp_path / "enc.pth"), "--out", str(tmp_path / "t")]  # fmt: skip
    assert main([*argv, "--encoder-kwargs", '{"depth": 1, "embed_dim": 64, "num_heads": 2}', "--image-size", "28"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("digit tokenizer: error: refusing to load") and err.count("\n") == 0, err
    _assert_clean_refusal(err, "enc.pth", "system")
    assert not marker.exists() and not (tmp_path / "t").exists()
