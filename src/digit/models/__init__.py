"""Image GPTs (LlamaGen and DiGIT layouts), their presets, and loading a trained run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from digit.errors import DigitError
from digit.models.gpt import GPT, GPTConfig
from digit.models.presets import PRESETS, build_config

__all__ = ["GPT", "GPTConfig", "PRESETS", "build_config", "load_gpt_run"]


def load_gpt_run(run_dir: str | os.PathLike, device: Any = "cpu") -> tuple[GPT, dict[str, Any]]:
    """Rebuild the GPT of a `digit train` run directory: (model in eval mode, config.json dict).

    Run directories written before the one module naming (config with ``arch``, weights under LlamaGen's or
    fairseq's names, e.g. the shipped CIFAR-10 models) are converted in memory by `digit.convert.keys`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from digit.convert.keys import upgrade_state_dict
    from digit.utils.io import read_json

    run = Path(run_dir)
    cfg_path, weights = run / "config.json", run / "model.safetensors"
    if not run.is_dir():
        raise DigitError(f"run directory not found: {run}")
    for p in (cfg_path, weights):
        if not p.is_file():
            raise DigitError(f"{run} is not a GPT run directory (missing {p.name})")
    config = read_json(cfg_path)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise DigitError(f"{cfg_path} has no 'model' section")
    model = GPT(GPTConfig.from_dict(config["model"]))  # a config from before the behaviour switches is upgraded
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise DigitError(f"cannot read {weights}: {e}") from e
    state = upgrade_state_dict(state)  # weights saved under the LlamaGen / fairseq names are renamed in memory
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DigitError(
            f"{weights} does not match config.json: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise DigitError(
            f"{weights}: {k} has shape {tuple(state[k].shape)}, config.json implies {tuple(expected[k].shape)}"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), config
