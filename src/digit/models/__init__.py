"""Image GPTs (LlamaGen and DiGIT layouts), their presets, and loading a trained run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from digit.errors import DigitError
from digit.models.conditions import Caption, left_pad_captions
from digit.models.gpt import GPT, GPTConfig
from digit.models.presets import PRESETS, build_config
from digit.utils.artifacts import GRID, OBJECT, POSITIVE_INT, config_from_dict, load_safetensors, read_json_object

__all__ = [
    "GPT",
    "Caption",
    "GPTConfig",
    "PRESETS",
    "build_config",
    "left_pad_captions",
    "load_gpt_run",
    "read_run_config",
]


RUN_SCHEMA = {"model": {"vocab_size": POSITIVE_INT, "grid": GRID}, "data?": OBJECT, "train?": OBJECT}


def read_run_config(run_dir: str | os.PathLike) -> tuple[dict[str, Any], GPTConfig]:
    """A GPT run's validated ``config.json``: (the dict, its model section as a GPTConfig). Loads no weights."""
    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not run.is_dir():
        raise DigitError(f"run directory not found: {run}")
    if not cfg_path.is_file():
        raise DigitError(f"{run} is not a GPT run directory (missing config.json)")
    config = read_json_object(cfg_path, RUN_SCHEMA)
    return config, config_from_dict(GPTConfig, config["model"], cfg_path, "model", upgrade=_upgrade)


def _upgrade(model: dict[str, Any]) -> dict[str, Any]:
    """Configs written before the behaviour switches carry ``arch`` (e.g. the shipped CIFAR-10 models)."""
    from digit.convert.keys import upgrade_config

    return upgrade_config(model) if "arch" in model else model


def load_gpt_run(run_dir: str | os.PathLike, device: Any = "cpu") -> tuple[GPT, dict[str, Any]]:
    """Rebuild the GPT of a `digit train` run directory: (model in eval mode, config.json dict).

    Run directories written before the one module naming (config with ``arch``, weights under LlamaGen's or
    fairseq's names, e.g. the shipped CIFAR-10 models) are converted in memory by `digit.convert.keys`."""
    from digit.convert.keys import upgrade_state_dict

    run = Path(run_dir)
    config, model_cfg = read_run_config(run)
    weights = run / "model.safetensors"
    if not weights.is_file():
        raise DigitError(f"{run} is not a GPT run directory (missing {weights.name})")
    try:
        model = GPT(model_cfg)
    except (RuntimeError, ValueError) as e:  # sizes that pass the type checks but build no model (negative widths)
        raise DigitError(f"{run / 'config.json'}: the model section builds no model ({e})") from e
    state = upgrade_state_dict(load_safetensors(weights))  # LlamaGen / fairseq names are renamed in memory
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
