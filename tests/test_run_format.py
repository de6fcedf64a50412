"""Run directories across the module renaming: the state-dict adapters of `digit.convert.keys`, run directories
written before the one naming (config with ``arch``, weights under LlamaGen's / fairseq's names) loading unchanged,
and the shipped CIFAR-10 models giving their recorded token ids, as shipped and rewritten in the former layout."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
import torch

from digit.convert.keys import (
    from_fairseq,
    from_llamagen,
    state_dict_layout,
    to_fairseq,
    to_llamagen,
    upgrade_config,
    upgrade_state_dict,
)
from digit.errors import DigitError
from digit.models import GPT, GPTConfig, build_config, load_gpt_run
from digit.utils.io import atomic_save_safetensors

V = 64


def randomized(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def tiny(arch: str, cond: str, **kw) -> GPTConfig:
    extra = {"class": {"num_classes": 5}, "prefix": {"prefix_vocab_size": 11, "prefix_grid": (2, 3)}}.get(cond, {})
    return build_config("tiny", arch=arch, cond=cond, n_layers=1, **extra, **kw)


def cond_for(cfg: GPTConfig, B: int = 2):
    g = torch.Generator().manual_seed(1)
    if cfg.cond == "class":
        return torch.randint(0, cfg.num_classes, (B,), generator=g)
    if cfg.cond == "prefix":
        return torch.randint(0, cfg.prefix_vocab_size, (B, cfg.prefix_len), generator=g)
    return None


# The key sets of run directories written before the renaming (state_dict() of the former GPT for these configs).
OLD_FAIRSEQ_PREFIX = {
    "embed_positions.weight", "embed_positions_1.weight", "embed_tokens.weight", "layer_norm.bias",
    "layer_norm.weight", "layers.0.fc1.bias", "layers.0.fc1.weight", "layers.0.fc2.bias", "layers.0.fc2.weight",
    "layers.0.final_layer_norm.bias", "layers.0.final_layer_norm.weight", "layers.0.self_attn.k_proj.bias",
    "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.out_proj.bias", "layers.0.self_attn.out_proj.weight",
    "layers.0.self_attn.q_proj.bias", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.v_proj.bias",
    "layers.0.self_attn.v_proj.weight", "layers.0.self_attn_layer_norm.bias", "layers.0.self_attn_layer_norm.weight",
    "output_projection.weight", "prefix_embedding.embedding_table.weight", "prefix_embedding.start",
}  # fmt: skip
OLD_LLAMA_NONE = {
    "layers.0.attention.wo.weight", "layers.0.attention.wqkv.weight", "layers.0.attention_norm.weight",
    "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight", "layers.0.feed_forward.w3.weight",
    "layers.0.ffn_norm.weight", "norm.weight", "output.weight", "start_embedding.start", "tok_embeddings.weight",
}  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "cond", "kw"),
    [("llama", "none", {}), ("llama", "class", {}), ("llama", "prefix", {}), ("fairseq", "none", {}),
     ("fairseq", "class", {}), ("fairseq", "prefix", {"norm_first": True})],
)  # fmt: skip
def test_adapters_round_trip_exactly(arch, cond, kw):
    sd = randomized(tiny(arch, cond, **kw)).state_dict()
    to_, from_ = (to_llamagen, from_llamagen) if arch == "llama" else (to_fairseq, from_fairseq)
    foreign = to_(sd)
    assert not set(foreign) & set(sd)  # every name changes
    back = from_(foreign)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    if arch == "fairseq":  # under a prefix too, with fairseq's version tensor ignored
        whole = {**to_fairseq(sd, prefix="decoder."), "decoder.version": torch.tensor([3.0])}
        assert all(k.startswith("decoder.") for k in whole)
        assert all(torch.equal(v, sd[k]) for k, v in from_fairseq(whole, prefix="decoder.").items())


def test_adapters_reproduce_the_former_names_and_split_qkv():
    fs = randomized(tiny("fairseq", "prefix", norm_first=True)).state_dict()
    old = to_fairseq(fs)
    assert set(old) == OLD_FAIRSEQ_PREFIX
    d = fs["blocks.0.attn.qkv.weight"].shape[1]
    torch.testing.assert_close(old["layers.0.self_attn.k_proj.weight"], fs["blocks.0.attn.qkv.weight"][d : 2 * d])
    torch.testing.assert_close(old["layers.0.self_attn.v_proj.bias"], fs["blocks.0.attn.qkv.bias"][2 * d :])
    assert set(to_llamagen(randomized(tiny("llama", "none")).state_dict())) == OLD_LLAMA_NONE
    assert to_llamagen(randomized(tiny("llama", "class")).state_dict()).keys() >= {
        "cls_embedding.embedding_table.weight",
        "tok_embeddings.weight",
    }


def test_adapters_refuse_unknown_and_incomplete_keys():
    sd = randomized(tiny("llama", "class")).state_dict()
    with pytest.raises(DigitError, match="not in the LlamaGen layout: bogus.weight"):
        to_llamagen({**sd, "bogus.weight": torch.zeros(1)})
    with pytest.raises(DigitError, match="not in the LlamaGen layout"):
        from_llamagen({"layers.0.attention.wq.weight": torch.zeros(1)})
    old = to_fairseq(randomized(tiny("fairseq", "none")).state_dict())
    del old["layers.0.self_attn.k_proj.bias"]
    with pytest.raises(DigitError, match="expected q, k and v"):
        from_fairseq(old)
    with pytest.raises(DigitError, match="not a GPT state dict"):
        state_dict_layout({"something.weight": torch.zeros(1)})


def _old_config(cfg: GPTConfig, arch: str) -> dict:
    """config.json["model"] as the former GPTConfig wrote it: ``arch`` instead of the behaviour switches."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("norm", "mlp", "positions", "bias", "scale_embeddings",
                                                               "init")}  # fmt: skip
    d["arch"] = arch
    d["norm_first"] = None if arch == "llama" or not cfg.norm_first else True
    return d


@pytest.mark.parametrize(
    ("arch", "cond", "kw"),
    [("llama", "class", {}), ("fairseq", "none", {"bos_id": 2}), ("fairseq", "prefix", {"norm_first": True})],
)
def test_former_run_directories_load_unchanged(tmp_path, arch, cond, kw):
    model = randomized(tiny(arch, cond, **kw), seed=3)
    old_sd = (to_llamagen if arch == "llama" else to_fairseq)(model.state_dict())
    old_cfg = _old_config(model.config, arch)
    assert GPTConfig.from_dict(old_cfg) == model.config and upgrade_config(old_cfg) == model.config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"model": old_cfg, "train": {}, "data": {}}))
    atomic_save_safetensors(tmp_path / "model.safetensors", {k: v.contiguous() for k, v in old_sd.items()})
    loaded, config = load_gpt_run(tmp_path)
    assert config["model"] == old_cfg  # the file is untouched; only the model in memory is current
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(4))
    c = cond_for(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, c), model(tokens, c))
    assert upgrade_state_dict(model.state_dict()) is not None and state_dict_layout(model.state_dict()) == "digit"


def test_upgrade_config_refuses_unknown_arch():
    cfg = _old_config(tiny("llama", "none"), "llama")
    with pytest.raises(DigitError, match="unknown arch 'gpt2'"):
        GPTConfig.from_dict({**cfg, "arch": "gpt2"})


# ------------------------------------------------- the shipped models, as shipped and rewritten in the former layout
ASSETS = files("digit") / "assets" / "cifar10"
# Recorded from the shipped models (route distill, GPT seed 0) when they were shipped: greedy decoding through prefill
# / decode_step, and the per-position argmax of a teacher-forced forward, both in fp32 on the CPU (the same with the
# kernels capped at AVX2).
STAGE1_GREEDY = [
    [
        395,
        395,
        402,
        402,
        402,
        402,
        261,
        261,
        395,
        395,
        402,
        402,
        402,
        402,
        261,
        261,
        395,
        395,
        2,
        2,
        2,
        2,
        128,
        261,
        128,
        128,
        2,
        427,
        427,
        2,
        128,
        128,
        128,
        128,
        427,
        427,
        427,
        427,
        128,
        128,
        128,
        128,
        441,
        427,
        427,
        441,
        128,
        128,
        201,
        305,
        305,
        441,
        441,
        305,
        305,
        201,
        201,
        305,
        305,
        305,
        305,
        305,
        201,
        201,
    ],
    [
        251,
        251,
        227,
        227,
        227,
        227,
        220,
        220,
        251,
        251,
        227,
        227,
        227,
        227,
        220,
        220,
        73,
        73,
        471,
        471,
        471,
        471,
        471,
        28,
        73,
        73,
        384,
        384,
        384,
        384,
        456,
        456,
        156,
        156,
        384,
        384,
        384,
        384,
        456,
        456,
        156,
        156,
        134,
        134,
        134,
        134,
        330,
        330,
        474,
        474,
        237,
        237,
        237,
        237,
        138,
        138,
        218,
        218,
        217,
        217,
        217,
        217,
        234,
        234,
    ],
]
STAGE1_TEACHER_FORCED_ARGMAX = [[395, 172, 47, 117, 192, 323, 227, 460, 215, 9, 282, 85, 334, 172, 209, 231, 100, 458, 274, 458, 193, 341, 334, 231, 465, 393, 399, 193, 405, 458, 418, 458, 87, 107, 193, 82, 213, 192, 312, 431, 87, 81, 104, 47, 421, 431, 444, 99, 99, 229, 415, 284, 449, 269, 269, 196, 99, 149, 284, 88, 428, 240, 209, 209], [251, 183, 197, 290, 2, 2, 188, 53, 389, 492, 488, 244, 273, 335, 388, 387, 111, 390, 117, 434, 257, 469, 36, 210, 57, 434, 91, 119, 359, 98, 390, 68, 456, 392, 229, 53, 396, 439, 269, 283, 366, 397, 259, 356, 203, 67, 259, 88, 387, 259, 299, 280, 381, 381, 343, 387, 149, 428, 299, 299, 114, 415, 246, 428]]  # fmt: skip
STAGE2_GREEDY = [[180, 435, 496, 257, 477, 30, 435, 273, 98, 229, 0, 75, 4, 414, 52, 44, 481, 44, 71, 404, 57, 222, 71, 117, 302, 495, 6, 349, 501, 361, 453, 196, 87, 335, 399, 407, 16, 363, 103, 298, 261, 461, 461, 407, 85, 14, 16, 298, 56, 451, 103, 451, 301, 25, 483, 485, 454, 56, 203, 27, 203, 152, 56, 5], [180, 20, 22, 152, 36, 383, 489, 307, 222, 439, 168, 17, 289, 327, 494, 462, 495, 78, 468, 217, 185, 430, 150, 55, 345, 116, 447, 314, 280, 50, 82, 303, 116, 411, 103, 310, 421, 112, 29, 113, 31, 469, 367, 136, 126, 205, 395, 419, 312, 367, 477, 455, 502, 126, 398, 408, 23, 322, 28, 187, 227, 205, 430, 206]]  # fmt: skip


def greedy(model: GPT, cond: torch.Tensor, B: int, kv_len: bool) -> list[list[int]]:
    C, T = model.config.cond_len, model.config.seq_len
    model.setup_cache(B)
    out = [model.prefill(cond, B).argmax(-1)]
    for i in range(1, T):
        pos = torch.tensor([C + i - 1])
        out.append(model.decode_step(out[-1][:, None], pos, C + i if kv_len else None).argmax(-1))
    model.clear_cache()
    return torch.stack(out, 1).tolist()


def _former_layout_copy(run, dst):
    """``run`` written as a run directory from before the one naming: config with ``arch``, LlamaGen's key names."""
    model, config = load_gpt_run(run)
    config["model"] = _old_config(model.config, "llama")
    assert GPTConfig.from_dict(config["model"]) == model.config
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(config))
    atomic_save_safetensors(
        dst / "model.safetensors", {k: v.contiguous() for k, v in to_llamagen(model.state_dict()).items()}
    )
    return dst


@pytest.mark.parametrize("layout", ["as shipped", "former"])
def test_shipped_models_give_their_recorded_token_ids(tmp_path, layout):
    from safetensors import safe_open

    runs = {part: ASSETS / part for part in ("stage1", "stage2")}
    if layout == "former":
        runs = {part: _former_layout_copy(run, tmp_path / part) for part, run in runs.items()}
        with safe_open(str(runs["stage1"] / "model.safetensors"), "pt") as f:
            assert "tok_embeddings.weight" in f.keys()  # LlamaGen's names on disk: converted in memory when loaded
    torch.manual_seed(0)
    with torch.inference_mode():
        s1, _ = load_gpt_run(runs["stage1"])
        s2, _ = load_gpt_run(runs["stage2"])
        labels = torch.tensor([2, 9])
        x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
        assert greedy(s1, labels, 2, kv_len=True) == greedy(s1, labels, 2, kv_len=False) == STAGE1_GREEDY
        assert s1(x, labels).argmax(-1).tolist() == STAGE1_TEACHER_FORCED_ARGMAX
        assert greedy(s2, x, 2, kv_len=False) == STAGE2_GREEDY


def test_convert_upgrade_rewrites_a_former_run_once(tmp_path, capsys):
    from digit.cli import main

    model = randomized(tiny("fairseq", "prefix", norm_first=True), seed=5)
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": _old_config(model.config, "fairseq"), "train": {"lr": 1.0}, "data": {}}
    (run / "config.json").write_text(json.dumps(config))
    atomic_save_safetensors(run / "model.safetensors", to_fairseq(model.state_dict()))
    (run / "metrics.jsonl").write_text("{}\n")
    assert main(["convert", "upgrade", str(run)]) == 0
    assert "rewritten in the current format" in capsys.readouterr().out
    from safetensors.torch import load_file

    on_disk = load_file(str(run / "model.safetensors"))
    assert on_disk.keys() == model.state_dict().keys()
    new_cfg = json.loads((run / "config.json").read_text())
    assert new_cfg["model"] == model.config.to_dict() and new_cfg["train"] == {"lr": 1.0}
    assert (run / "metrics.jsonl").read_text() == "{}\n"  # other files untouched
    loaded, _ = load_gpt_run(run)
    tokens, c = torch.randint(0, V, (2, 16)), cond_for(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, c), model(tokens, c))
    assert main(["convert", "upgrade", str(run)]) == 0
    assert "already in the current format" in capsys.readouterr().out
    # refusals: a resumable run, a directory that is not a run, weights that do not fit the config
    (run / "train_state.pt").write_bytes(b"")
    assert main(["convert", "upgrade", str(run)]) == 2
    assert "train_state.pt" in capsys.readouterr().err
    assert main(["convert", "upgrade", str(tmp_path)]) == 2
    assert "missing config.json" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model": _old_config(tiny("fairseq", "none"), "fairseq")}))
    atomic_save_safetensors(bad / "model.safetensors", to_fairseq(model.state_dict()))
    assert main(["convert", "upgrade", str(bad)]) == 2
    assert "do not fit" in capsys.readouterr().err
    assert json.loads((bad / "config.json").read_text())["model"]["arch"] == "fairseq"  # nothing written
