"""Run directories across the module renaming: the state-dict adapters of `digit.convert.keys`, run directories
written before the one naming (config with ``arch``, weights under LlamaGen's / fairseq's names) loading unchanged,
and the shipped CIFAR-10 models giving the token ids they gave before the renaming."""

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


# ---------------------------------------------------------------- the shipped models (former layout on disk)
ASSETS = files("digit") / "assets" / "cifar10"
# Computed with the GPT before the renaming (main at 0e434b5): greedy decoding through prefill / decode_step, and the
# per-position argmax of a teacher-forced forward, both in fp32 on the CPU.
STAGE1_GREEDY = [[371] * 64, [251] * 64]  # labels [2, 9]
STAGE1_TEACHER_FORCED_ARGMAX = [
    [371, 144, 283, 167, 336, 215, 251, 203, 283, 341, 181, 277, 231, 292, 283, 336, 149, 48, 471, 468, 407, 289, 150,
     502, 363, 438, 301, 407, 213, 48, 239, 15, 474, 115, 464, 384, 242, 384, 96, 367, 115, 242, 3, 354, 48, 384, 334,
     184, 181, 68, 341, 181, 224, 209, 181, 468, 398, 358, 269, 150, 96, 217, 509, 23],
    [251, 72, 28, 356, 128, 128, 196, 322, 67, 438, 223, 67, 67, 420, 420, 75, 283, 147, 48, 174, 384, 150, 197, 380,
     26, 226, 376, 230, 72, 99, 78, 57, 363, 423, 283, 242, 429, 141, 471, 384, 413, 239, 432, 0, 111, 434, 134, 82,
     351, 356, 400, 434, 400, 395, 82, 150, 307, 219, 452, 283, 67, 111, 197, 289],
]  # fmt: skip
STAGE2_GREEDY = [
    [343, 233, 260, 377, 294, 167, 95, 203, 36, 309, 153, 28, 210, 52, 125, 203, 508, 128, 287, 52, 292, 391, 112, 509,
     70, 345, 134, 371, 63, 434, 361, 133, 335, 474, 409, 426, 210, 152, 290, 137, 88, 59, 144, 341, 290, 320, 301,
     239, 209, 421, 234, 231, 494, 367, 0, 232, 15, 467, 416, 230, 22, 189, 341, 314],
    [343, 203, 288, 212, 113, 244, 124, 28, 279, 390, 187, 214, 507, 282, 189, 95, 411, 357, 48, 257, 416, 153, 259,
     367, 296, 137, 37, 26, 234, 479, 95, 509, 279, 113, 371, 370, 214, 175, 150, 81, 279, 290, 353, 492, 317, 234, 88,
     205, 279, 301, 404, 409, 204, 384, 384, 140, 141, 301, 117, 373, 306, 183, 387, 22],
]  # fmt: skip


def greedy(model: GPT, cond: torch.Tensor, B: int, kv_len: bool) -> list[list[int]]:
    C, T = model.config.cond_len, model.config.seq_len
    model.setup_cache(B)
    out = [model.prefill(cond, B).argmax(-1)]
    for i in range(1, T):
        pos = torch.tensor([C + i - 1])
        out.append(model.decode_step(out[-1][:, None], pos, C + i if kv_len else None).argmax(-1))
    model.clear_cache()
    return torch.stack(out, 1).tolist()


def test_shipped_models_give_the_token_ids_of_the_former_layout():
    from safetensors import safe_open

    with safe_open(str(ASSETS / "stage1" / "model.safetensors"), "pt") as f:
        assert "tok_embeddings.weight" in f.keys()  # the shipped files keep the former names: converted in memory
    torch.manual_seed(0)
    with torch.inference_mode():
        s1, _ = load_gpt_run(ASSETS / "stage1")
        s2, _ = load_gpt_run(ASSETS / "stage2")
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
