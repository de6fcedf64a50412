"""The HTTP API's request and response shapes: a JSON body -> a validated `GenerationSpec`, PNGs -> a JSON answer.

``POST /v1/images/generations`` takes::

    {"class": 3 | "class_name": "cat",        # one of them for a class-conditional model, neither otherwise
     "prompt": "a red circle",                 # a text-conditional model's caption (and no class)
     "n": 1, "seed": 0,                         # images, and the seed image i's random stream is derived from
     "temperature": 1.0, "top_k": 0, ...,       # stage-1 sampling: SamplingParams' field names (ar decoding)
     "decoder": {"top_p": 0.8, ...},            # the stage-2 decoder's SamplingParams (a DiGIT model only)
     "timeout": 30, "stream": false}            # a shorter limit than the server's; NDJSON progress events

Every value is checked by `SamplingParams` (the same rules and messages as the CLI and the Python API); a refusal is
a `DigitError` the app answers with 400 and ``{"error": {"type": "invalid_request", "message": ...}}``.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from digit.errors import DigitError
from digit.sampling.params import SamplingParams
from digit.serve.service import GeneratedImages, GenerationSpec, ServeConfig

# stage 1 runs on the engine: autoregressive, one token per step (no Jacobi, no MaskGIT settings)
STAGE1_FIELDS = ("temperature", "top_k", "top_p", "cfg_scale", "cfg_interval", "cfg_schedule")
# the stage-2 decoder: AR (Jacobi too) or MaskGIT, as `digit generate --decoder-*`
DECODER_FIELDS = ("temperature", "top_k", "top_p", "decode", "nar_steps", "nar_temperature")
REQUEST_FIELDS = ("class", "class_name", "prompt", "n", "seed", "decoder", "timeout", "stream", *STAGE1_FIELDS)
MAX_SEED = 2**63 - 1


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DigitError(f"the body is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DigitError(f"the body must be a JSON object, got {type(data).__name__}")
    return data


def _prompt(data: dict[str, Any], pipe: Any) -> str | None:
    """A text-conditional model's caption (`digit.prompts.check_prompt`); refused for the other models."""
    from digit.prompts import check_prompt

    given = data.get("prompt")
    if not pipe.is_text:
        if given is not None:
            raise DigitError(f"prompt given but the model is {pipe.stage1.config.cond}-conditional, not text")
        return None
    if given is None:
        raise DigitError("this model is text-conditional: give prompt (a caption)")
    return check_prompt(given, "prompt")


def _label(data: dict[str, Any], pipe: Any) -> int | None:
    k, names = pipe.num_classes, pipe.class_names
    given = [key for key in ("class", "class_name") if data.get(key) is not None]
    if pipe.is_text and given:
        raise DigitError(f"{given[0]} given but the model is text-conditional: give prompt instead")
    if not k:
        if given:
            raise DigitError(f"{given[0]} given but the model is unconditional")
        return None
    if len(given) != 1:
        raise DigitError(f"give exactly one of class (an index in [0, {k})) or class_name (one of the model's names)")
    if given[0] == "class":
        v = data["class"]
        if not _int(v) or not 0 <= v < k:
            raise DigitError(f"class must be an integer in [0, {k}), got {v!r}")
        return v
    name = data["class_name"]
    if name not in names:
        known = ", ".join(names) if names else "none: this model has no class names, give class"
        raise DigitError(f"unknown class_name {name!r} (known: {known})")
    return names.index(name)


def _params(values: dict[str, Any], allowed: tuple[str, ...], base: SamplingParams, label: str) -> SamplingParams:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise DigitError(
            f"{label}: unknown or unsupported parameters {', '.join(unknown)} (allowed: {', '.join(allowed)})"
        )
    return base.replace(**values)  # SamplingParams validates every value and names the field


def parse_generation(data: dict[str, Any], pipe: Any, config: ServeConfig) -> GenerationSpec:
    """Validate a request body against the model and the server's limits."""
    from digit.pipeline import decoder_defaults

    unknown = sorted(set(data) - set(REQUEST_FIELDS))
    if unknown:
        raise DigitError(f"unknown fields: {', '.join(unknown)} (allowed: {', '.join(REQUEST_FIELDS)})")
    label = _label(data, pipe)
    prompt = _prompt(data, pipe)
    n = data.get("n", 1)
    if not _int(n) or not 1 <= n <= config.max_images:
        raise DigitError(f"n must be an integer in [1, {config.max_images}] (the server's --max-images), got {n!r}")
    seed = data.get("seed", 0)
    if not _int(seed) or not 0 <= seed <= MAX_SEED:
        raise DigitError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    stage1 = _params({f: data[f] for f in STAGE1_FIELDS if f in data}, STAGE1_FIELDS, SamplingParams(), "sampling")
    if stage1.guided:
        from digit.sampling.generate import check_params

        check_params(pipe.stage1, stage1)  # a class- or text-conditional model trained with class dropout
    decoder = None
    if pipe.decoder is not None:
        given = data.get("decoder") or {}
        if not isinstance(given, dict):
            raise DigitError(f"decoder must be a JSON object of sampling parameters, got {type(given).__name__}")
        decoder = _params(given, DECODER_FIELDS, decoder_defaults(pipe.kind), "decoder")
        if decoder.decode == "jacobi" and pipe.kind != "digit-ar":
            raise DigitError("decoder decode 'jacobi' needs an autoregressive stage-2 decoder")
    elif data.get("decoder") is not None:
        raise DigitError("decoder parameters given but the model has no stage-2 decoder")
    timeout = data.get("timeout", config.timeout)
    if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout)):
        raise DigitError(f"timeout must be a number of seconds, got {timeout!r}")
    if not 0 < timeout <= config.timeout:
        raise DigitError(
            f"timeout must be in (0, {config.timeout:g}] seconds (the server's --timeout), got {timeout!r}"
        )
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise DigitError(f"stream must be true or false, got {stream!r}")
    return GenerationSpec(label, n, seed, stage1, decoder, float(timeout), stream, prompt)


def class_name(pipe: Any, label: int | None) -> str | None:
    names = pipe.class_names
    return names[label] if label is not None and label < len(names) else None


def generation_response(spec: GenerationSpec, result: GeneratedImages, pipe: Any, model: str) -> dict[str, Any]:
    """The answer: base64 PNGs in image order, with every parameter that made them (enough to reproduce them)."""
    return {
        "model": model,
        "class": spec.label,
        "class_name": class_name(pipe, spec.label),
        "prompt": spec.prompt,
        "n": spec.n,
        "seed": spec.seed,
        "parameters": {
            "stage1": spec.stage1.to_dict(),
            "decoder": spec.decoder.to_dict() if spec.decoder is not None else None,
        },
        "data": [{"index": i, "b64_json": base64.b64encode(png).decode("ascii")} for i, png in enumerate(result.pngs)],
        "timings": {k: round(v, 6) for k, v in result.timings.items()},
    }


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}
