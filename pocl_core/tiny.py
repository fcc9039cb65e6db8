"""Tiny teacher/student pairs built locally (no download), for tests and the smoke-test config.

``build_tiny_models`` trains a byte-level BPE tokenizer on the given texts, builds a Llama teacher
and a smaller Llama student sharing it, optionally warms the teacher up with a few steps of
supervised training on the texts (so distillation has something to transfer), and saves all three
with ``save_pretrained`` (safetensors). They load back through ``AutoModelForCausalLM``.

Each model folder is written beside its place and renamed into it once complete, with a
``pocl_prep.json`` recording what it was built from (as ``pocl_core.model_prep`` does): an
interrupted build leaves no folder, and a complete one from the same inputs is kept as it is.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from pocl_core.model_prep import build_atomically, existing_build

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


@dataclass(frozen=True)
class TinyPaths:
    teacher: Path
    student: Path


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer with <pad>=0, <s>=1, </s>=2; BOS is prepended to encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _llama(vocab_size: int, hidden: int, layers: int, heads: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _warm_up(model: torch.nn.Module, tokenizer, texts: Sequence[str], steps: int, seed: int) -> None:
    """A few AdamW steps of plain next-token training on ``texts`` (the teacher's 'pretraining')."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(texts), (16,), generator=gen).tolist()
        enc = tokenizer([texts[i] + tokenizer.eos_token for i in idx], return_tensors="pt",
                        padding=True, truncation=True, max_length=128)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _build_records(texts: Sequence[str], vocab_size: int, teacher_layers: int, teacher_hidden: int,
                   student_layers: int, student_hidden: int, teacher_warmup_steps: int, seed: int) -> dict[str, dict]:
    """What each folder is built from, as its ``pocl_prep.json`` records it."""
    common = {"kind": "tiny", "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16],
              "vocab_size": vocab_size, "seed": seed}
    return {"teacher": {**common, "role": "teacher", "layers": teacher_layers, "hidden": teacher_hidden,
                        "warmup_steps": teacher_warmup_steps},
            "student": {**common, "role": "student", "layers": student_layers, "hidden": student_hidden}}


def existing_tiny_models(out_dir: str | Path, texts: Sequence[str], *, vocab_size: int = 512,
                         teacher_layers: int = 4, teacher_hidden: int = 64, student_layers: int = 2,
                         student_hidden: int = 32, teacher_warmup_steps: int = 0, seed: int = 0) -> TinyPaths | None:
    """The pair in ``out_dir`` when both folders hold complete builds with these arguments (those of
    ``build_tiny_models``), else None; ModelPrepError for a folder there that is not such a build
    (no ``pocl_prep.json``: an interrupted or older build, or other inputs)."""
    out = Path(out_dir)
    records = _build_records(texts, vocab_size, teacher_layers, teacher_hidden, student_layers, student_hidden,
                             teacher_warmup_steps, seed)
    found = [existing_build(out / name, record) for name, record in records.items()]
    return TinyPaths(out / "teacher", out / "student") if all(found) else None


def remove_tiny_models(out_dir: str | Path) -> None:
    """Delete ``out_dir/teacher`` and ``out_dir/student`` (for a rebuild); absent ones are skipped."""
    for name in ("teacher", "student"):
        path = Path(out_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def build_tiny_models(out_dir: str | Path, texts: Sequence[str], *, vocab_size: int = 512,
                      teacher_layers: int = 4, teacher_hidden: int = 64, student_layers: int = 2,
                      student_hidden: int = 32, teacher_warmup_steps: int = 0, seed: int = 0) -> TinyPaths:
    """Build and save ``out_dir/teacher`` and ``out_dir/student`` (each with the shared tokenizer).

    Returns their paths. A folder already holding the build with these arguments is kept (only a
    missing one is built); one holding anything else is a ModelPrepError (``remove_tiny_models``
    clears the way). Rebuilding with the same arguments gives the same weights and tokenizer (seeded).
    """
    out = Path(out_dir)
    records = _build_records(texts, vocab_size, teacher_layers, teacher_hidden, student_layers, student_hidden,
                             teacher_warmup_steps, seed)
    paths = TinyPaths(out / "teacher", out / "student")
    missing = [name for name in records if existing_build(getattr(paths, name), records[name]) is None]
    if not missing:
        return paths
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    vocab = len(tokenizer)
    for name in missing:
        if name == "teacher":
            model = _llama(vocab, teacher_hidden, teacher_layers, heads=4, seed=seed)
            if teacher_warmup_steps:
                _warm_up(model, tokenizer, texts, teacher_warmup_steps, seed)
        else:
            model = _llama(vocab, student_hidden, student_layers, heads=2, seed=seed + 1)

        def write(tmp: Path, model: torch.nn.Module = model) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        build_atomically(getattr(paths, name), records[name], write)
    return paths
