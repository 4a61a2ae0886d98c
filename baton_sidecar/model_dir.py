"""Check a user's model directory before transformers reads it, so a bad one fails by name.

transformers reports a broken directory deep in a traceback (a JSON decoder's message, a
``KeyError`` on a model type, a safetensors header error) or, for some faults, not at all
until the first request. ``check_model_dir`` names the file and the field instead; the server
prints that one line and exits non-zero (``server/serve.py``).
"""

from __future__ import annotations

import json
from pathlib import Path


class ModelLoadError(ValueError):
    """A model that cannot be served; the message is one line naming the cause."""


def check_model_dir(directory: Path) -> None:
    """Raise ``ModelLoadError`` for a missing or unreadable config, an unknown or non-causal
    architecture, or a weights file whose header cannot be read; else return."""
    import transformers  # here, not at import: the server imports this before it loads anything
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory} has no config.json (not a transformers model directory)")
    try:
        config = json.loads(config_path.read_text())
    except UnicodeDecodeError as error:
        raise ModelLoadError(f"{config_path} is not UTF-8 text ({error.reason})") from None
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{config_path} is not valid JSON: {error.msg} at line {error.lineno} "
                             f"column {error.colno}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} must hold a JSON object, not {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"{config_path} names no model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(f"{config_path}: model_type {model_type!r} is not an architecture transformers "
                             f"{transformers.__version__} knows")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(f"{config_path}: model_type {model_type!r} is not a causal language model "
                             "(Baton serves decoder-only text generation)")
    check_weights(directory)


def check_weights(directory: Path) -> None:
    """Every safetensors file's header and size are read (not its tensors): a truncated or
    foreign file fails here, named, instead of inside the loader."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files and not any(directory.glob("*.bin")):
        raise ModelLoadError(f"{directory} holds no weights (*.safetensors or *.bin)")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name)
        except Exception as error:  # safetensors raises its own error type, and OSError
            raise ModelLoadError(f"{path} is not a readable safetensors file: {first_line(error)}") from None


def first_line(error: BaseException) -> str:
    """An exception's message, first line only (loaders' messages run on); its type if empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
