"""Loading teacher, student and tokenizer through the standard Hugging Face paths, and fingerprints.

Safe defaults: ``trust_remote_code`` comes from the config (default False) and weights are read
from safetensors where the folder has them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from pocl_core.config import ConfigError
from pocl_core.fingerprints import hash_files
from pocl_core.lm_head import check_head

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _from_pretrained(auto_class: Any, name_or_path: str, what: str, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(name_or_path, **kwargs)``; what it cannot load (an OSError: no such
    local folder and no such hub repo, no network, or a folder missing its files; a ValueError from a
    local folder: unreadable files) is a ConfigError naming where it was looked for."""
    path = Path(name_or_path).expanduser()
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and not path.exists():
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if path.exists():
            raise ConfigError(f"{what} folder {path.resolve()}: cannot load it ({first})") from None
        raise ConfigError(f"{what} {name_or_path!r}: not a local folder ({path.resolve()} does not exist; relative "
                          f"paths start at the current directory {Path.cwd()}) and not loadable from the Hugging "
                          f"Face hub ({first}); check models.teacher / models.student / models.tokenizer") from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer with a pad token guaranteed (EOS is reused when the tokenizer has none); a
    tokenizer that cannot be loaded is a ConfigError naming where it was looked for."""
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, name_or_path, "tokenizer", trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def config_vocab_size(name_or_path: str, trust_remote_code: bool = False) -> int:
    """A model's logit width (embedding rows) from its config alone, without loading weights."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, name_or_path, "model", trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _scaled_rope(text: dict) -> bool:
    """True when a config stretches its rotary positions beyond max_position_embeddings (rope_scaling,
    or rope_parameters of a type other than the default)."""
    for key in ("rope_scaling", "rope_parameters"):
        value = text.get(key)
        if isinstance(value, dict) and value.get("rope_type", value.get("type", "default")) not in ("default", None):
            return True
    return False


def trained_context(config: dict) -> int | None:
    """The positions a model's config.json (parsed) says it was built for, the largest its keys give (its
    text config's for a multimodal model); None when it does not say, or when positions are no hard
    limit: rotary scaling (rope_scaling) or ALiBi, which has no position table to run past."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if _scaled_rope(text) or any("alibi" in str(k).lower() and v for k, v in text.items()) \
            or text.get("model_type") in ("bloom", "mpt"):
        return None
    values = [text.get(k) for k in CONTEXT_KEYS]
    values = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return max(values) if values else None


def cpu_has_native_bf16() -> bool:
    """True when this x86 CPU has AVX512-BF16 or AMX (Linux /proc/cpuinfo); otherwise bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown platform: do not warn
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def warn_if_slow_dtype(dtype: str, device: torch.device) -> None:
    """Log a warning when a bf16/fp16 model will run emulated (and very slowly) on this CPU."""
    if device.type == "cpu" and dtype in ("bfloat16", "float16") and not cpu_has_native_bf16():
        logging.getLogger("pocl").warning(
            "%s on a CPU without native bf16 support (no AVX512-BF16/AMX) is emulated and can be ~50x "
            "slower than float32; use float32 here", dtype)


def load_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                   device: str | torch.device = "cpu") -> torch.nn.Module:
    """AutoModelForCausalLM in ``dtype`` on ``device`` (safetensors preferred).

    Refused (ValueError) when its logits are not what ``pocl_core.lm_head.head_logits`` computes from
    its hidden states: every loss and measure here runs the head only at response positions. A model
    that cannot be loaded is a ConfigError naming where it was looked for.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {sorted(DTYPES)}")
    warn_if_slow_dtype(dtype, torch.device(device))
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, "model", dtype=DTYPES[dtype],
                             trust_remote_code=trust_remote_code, use_safetensors=_has_safetensors(name_or_path))
    model = model.to(device)
    check_head(model, name_or_path)
    return model


def causal_lm_skeleton(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False) -> torch.nn.Module:
    """The model ``load_causal_lm`` would return, built on the meta device: its config and generation
    config from ``name_or_path``, no weight file read and no memory held for parameters or buffers.

    For ranks that receive their weights from rank 0 after sharding (``parallel.materialize_from_rank0``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {sorted(DTYPES)}")
    config = _from_pretrained(AutoConfig, name_or_path, "model", trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    try:  # what from_pretrained reads beside the weights (end-of-sequence ids for generation)
        model.generation_config = GenerationConfig.from_pretrained(name_or_path)
    except OSError:
        pass  # no generation_config.json: from_config's, derived from config.json, is what loading gives too
    return model


def decode_only_as_configured(model: torch.nn.Module) -> torch.nn.Module:
    """Give ``model`` a generation config holding only its special-token ids, in place; returns it.

    ``generate`` fills every setting it is not passed from the model's ``generation_config.json``
    (a shipped ``repetition_penalty``, ``min_p``, ...), which would bend the method's decoding
    (``SamplingConfig``) without entering any provenance; after this, only what is passed applies.
    """
    from transformers import GenerationConfig

    old = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id,
                                               pad_token_id=old.pad_token_id)
    return model


def _has_safetensors(name_or_path: str) -> bool | None:
    p = Path(name_or_path)
    if p.is_dir():
        return any(p.glob("*.safetensors")) or None
    return None  # hub name: let transformers pick (it prefers safetensors)


def model_fingerprint(name_or_path: str) -> str:
    """sha256 (16 hex digits) of a local model folder's config and weight files, and of its Python files
    (the modelling code ``trust_remote_code`` runs; most folders have none); the name for hub ids."""
    p = Path(name_or_path)
    if not p.is_dir():
        return f"hub:{name_or_path}"
    files = sorted(
        f for f in p.iterdir()
        if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".py"))
    )
    if not files:
        raise FileNotFoundError(f"{p}: no config.json or weight files to fingerprint")
    return hash_files(files, p)


def weights_digest(folder: str | Path) -> str:
    """sha256 (16 hex digits) of a save_pretrained folder's weight files (``*.safetensors``, by name)."""
    p = Path(folder)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{p}: no .safetensors weight files")
    return hash_files(files, p)


# The files a Hugging Face tokenizer is loaded from (whichever of them a folder has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")


def tokenizer_fingerprint(name_or_path: str) -> str:
    """sha256 (16 hex digits) of a local folder's tokenizer files; the name for hub ids."""
    p = Path(name_or_path)
    if not p.is_dir():
        return f"hub:{name_or_path}"
    files = [p / name for name in TOKENIZER_FILES if (p / name).is_file()]
    if not files:
        raise FileNotFoundError(f"{p}: no tokenizer files to fingerprint (looked for {', '.join(TOKENIZER_FILES)})")
    return hash_files(files, p)


def resolve_device(use_gpu: bool) -> torch.device:
    """The CUDA device of this process (LOCAL_RANK) when ``use_gpu`` and one is visible, else the CPU
    (with a warning when a GPU was asked for)."""
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if use_gpu:
        logging.getLogger("pocl").warning("ray.use_gpu is true but no CUDA device is visible here: running on the CPU")
    return torch.device("cpu")
