"""`digit train --text-cond`: caption features stored with the tokens condition the GPT (LlamaGen t2i training)."""

import json

import numpy as np
import torch

from digit.cli import main
from digit.data.text_features import RandomTextEncoder, write_caption_features
from digit.data.tokens import read_token_dir, write_token_dir
from digit.models import Caption, load_gpt_run
from digit.sampling.generate import sample
from digit.sampling.params import SamplingParams
from digit.training.gpt_task import TokenDataset, read_captions

WORDS = ("red", "a blue one")  # caption i -> every token of the grid is 3 * i + 1


def captioned_tokens(path, n=16):
    texts = [WORDS[i % 2] for i in range(n)]
    tokens = np.stack([np.full((2, 2), 3 * (i % 2) + 1) for i in range(n)])
    d = write_token_dir(path, tokens, None, vocab_size=8)
    write_caption_features(d, texts, RandomTextEncoder(dim=8, max_length=12, seed=1))
    return d


def train(*args) -> int:
    return main(["train", "--model", "tiny", "--no-progress", "--log-every", "1", *map(str, args)])


def test_dataset_rows_are_left_padded_captions(tmp_path):
    d = captioned_tokens(tmp_path / "tok")
    tokens = read_token_dir(d)
    feats, mask = RandomTextEncoder(dim=8, max_length=12, seed=1).encode([WORDS[1]])
    n = int(mask.sum())  # "a blue one": 10 bytes of 12
    assert n == 10

    class Cfg:
        cond, caption_len, caption_dim = "text", 12, 8

    item = TokenDataset(tokens, None, read_captions(Cfg, tokens))[1]
    assert item["caption_mask"].tolist() == [False] * 2 + [True] * 10
    want = np.concatenate([np.zeros((2, 8)), feats[0, :n]]).astype(np.float16).astype(np.float32)  # stored fp16
    assert np.array_equal(item["caption_features"].numpy(), want)
    assert item["tokens"].tolist() == [4] * 4


def test_text_cond_training_learns_the_caption(tmp_path, capsys):
    d = captioned_tokens(tmp_path / "tok")
    run = tmp_path / "run"
    args = f"--tokens {d} --text-cond --class-dropout 0.1 --steps 40 --batch-size 8 --lr 3e-3 --seed 0 --out {run}"
    assert train(*args.split()) == 0
    cfg = json.loads((run / "config.json").read_text())
    m = cfg["model"]
    assert (m["cond"], m["caption_len"], m["caption_dim"], m["class_dropout"]) == ("text", 12, 8, 0.1)
    assert cfg["data"]["text_encoder"]["sha256"] == RandomTextEncoder(dim=8, max_length=12, seed=1).identity()["sha256"]
    model, _ = load_gpt_run(run)
    f, msk = RandomTextEncoder(dim=8, max_length=12, seed=1).encode(list(WORDS))
    from digit.models import left_pad_captions

    cap = left_pad_captions(torch.from_numpy(f).half().float(), torch.from_numpy(msk))
    out = sample(model, Caption(cap.features, cap.mask), params=SamplingParams(top_k=1)).tokens
    assert out.view(2, -1).tolist() == [[1] * 4, [4] * 4]


def test_text_cond_refusals(tmp_path, capsys):
    plain = write_token_dir(tmp_path / "plain", np.zeros((4, 2, 2), dtype=np.int64), None, vocab_size=8)
    assert train("--tokens", plain, "--text-cond", "--steps", "1", "--out", tmp_path / "r1") == 2
    assert "no caption features" in capsys.readouterr().err
    d = captioned_tokens(tmp_path / "tok")
    assert train("--tokens", d, "--text-cond", "--class-cond", "--steps", "1", "--out", tmp_path / "r2") == 2
    assert "choose one condition" in capsys.readouterr().err
    assert train("--tokens", d, "--text-cond", "--nar", "--steps", "1", "--out", tmp_path / "r3") == 2
    assert "causal" in capsys.readouterr().err


def test_sample_by_prompt_cli(tmp_path, capsys):
    d = captioned_tokens(tmp_path / "tok")
    run = tmp_path / "run"
    assert train(*f"--tokens {d} --text-cond --steps 40 --batch-size 8 --lr 3e-3 --out {run}".split()) == 0
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "text_encoder.json").write_text(json.dumps({"kind": "random-test", "dim": 8, "max_length": 12, "seed": 1}))
    base = ["sample", "--run", str(run), "--text-encoder", str(enc), "--top-k", "1"]
    prompts = ["--prompt", WORDS[0], "--prompt", WORDS[1]]
    for i, extra in enumerate((["-n", "4"], ["-n", "4", "--cfg-scale", "2.0"])):
        out = tmp_path / f"out{i}"
        assert main([*base, *prompts, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        got = read_token_dir(out)
        assert np.asarray(got.tokens).reshape(4, -1).tolist() == [[1] * 4, [4] * 4, [1] * 4, [4] * 4]
        assert got.meta["sampling"]["prompts"] == [WORDS[0], WORDS[1], WORDS[0], WORDS[1]]
    # a prompts file gives the same as the flags
    (tmp_path / "p.txt").write_text(f"{WORDS[1]}\n\n{WORDS[0]}\n")
    assert main([*base, "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "outf")]) == 0
    assert np.asarray(read_token_dir(tmp_path / "outf").tokens).reshape(2, -1).tolist() == [[4] * 4, [1] * 4]
    # refusals: another encoder, no prompt, -n below the prompt count
    other = tmp_path / "enc2"
    other.mkdir()
    (other / "text_encoder.json").write_text(json.dumps({"kind": "random-test", "dim": 8, "max_length": 12, "seed": 2}))
    capsys.readouterr()
    bad = [*base[:3], "--text-encoder", str(other), *prompts, "--out", str(tmp_path / "x1")]
    assert main(bad) == 2 and "not the encoder this run was trained with" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x2")]) == 2 and "--prompt" in capsys.readouterr().err
    assert main([*base, *prompts, "-n", "1", "--out", str(tmp_path / "x3")]) == 2
    assert "fewer than the 2 prompts" in capsys.readouterr().err


def _encoder_dir(path, seed=1):
    path.mkdir()
    (path / "text_encoder.json").write_text(
        json.dumps({"kind": "random-test", "dim": 8, "max_length": 12, "seed": seed})
    )
    return path


def test_train_checks_the_text_encoder_of_the_stored_features(tmp_path, capsys):
    """`--text-encoder DIR` at train time: the stored features' encoder identity (sha256) must be that encoder's."""
    d = captioned_tokens(tmp_path / "tok")
    base = ["--tokens", d, "--text-cond", "--steps", "1", "--batch-size", "4"]
    assert train(*base, "--text-encoder", _encoder_dir(tmp_path / "same"), "--out", tmp_path / "ok") == 0
    capsys.readouterr()
    assert train(*base, "--text-encoder", _encoder_dir(tmp_path / "other", seed=2), "--out", tmp_path / "bad") == 2
    err = capsys.readouterr().err
    assert "caption features made by text encoder 'random-bytes-d8-s1'" in err
    assert "not the 'random-bytes-d8-s2'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    plain = write_token_dir(tmp_path / "plain", np.zeros((4, 2, 2), dtype=np.int64), None, vocab_size=8)
    args = ["--tokens", plain, "--steps", "1", "--text-encoder", tmp_path / "same", "--out", tmp_path / "r"]
    assert train(*args) == 2 and "--text-encoder needs a text-conditional model" in capsys.readouterr().err


def test_init_from_a_text_run(tmp_path, capsys):
    """Fine-tuning a text-conditional run: its weights are the start (caption MLP and null caption included), the
    caption dropout may change, a frozen condition stays put, and features of another encoder than the init's are
    refused."""
    from safetensors.torch import load_file

    d = captioned_tokens(tmp_path / "tok")
    init = tmp_path / "init"
    assert train(*f"--tokens {d} --text-cond --steps 20 --batch-size 8 --lr 3e-3 --out {init}".split()) == 0
    w0 = load_file(str(init / "model.safetensors"))
    ft = tmp_path / "ft"
    args = f"--tokens {d} --init-from {init} --class-dropout 0.3 --freeze condition --steps 3 --batch-size 8"
    assert train(*args.split(), "--lr", "1e-2", "--out", ft) == 0, capsys.readouterr().err
    cfg = json.loads((ft / "config.json").read_text())
    assert (cfg["model"]["cond"], cfg["model"]["class_dropout"], cfg["model"]["caption_len"]) == ("text", 0.3, 12)
    assert cfg["init_from"]["path"] == str(init.resolve()) and cfg["init_from"]["freeze"] == ["condition"]
    assert cfg["data"]["text_encoder"]["sha256"] == RandomTextEncoder(dim=8, max_length=12, seed=1).identity()["sha256"]
    w1 = load_file(str(ft / "model.safetensors"))
    for k in ("condition.null_caption", "condition.mlp.up.weight", "condition.mlp.down.weight"):
        assert torch.equal(w0[k], w1[k]), k  # frozen: exactly the init's
    assert not torch.equal(w0["head.weight"], w1["head.weight"])  # the rest trained on
    # the fine-tuned run still samples by caption, as the init learned
    model, _ = load_gpt_run(ft)
    f, msk = RandomTextEncoder(dim=8, max_length=12, seed=1).encode(list(WORDS))
    from digit.models import left_pad_captions

    cap = left_pad_captions(torch.from_numpy(f).half().float(), torch.from_numpy(msk))
    assert sample(model, cap, params=SamplingParams(top_k=1)).tokens.view(2, -1).tolist() == [[1] * 4, [4] * 4]
    # caption features of another encoder than the init run's are refused
    other = write_token_dir(tmp_path / "tok2", np.stack([np.full((2, 2), 1)] * 4), None, vocab_size=8)
    write_caption_features(other, ["red"] * 4, RandomTextEncoder(dim=8, max_length=12, seed=2))
    capsys.readouterr()
    assert train("--tokens", other, "--init-from", init, "--steps", "1", "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "not the 'random-bytes-d8-s1'" in err and len(err.strip().splitlines()) == 1
