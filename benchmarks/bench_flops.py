"""What the cached teacher can save at most: FLOPs of a live vs a cached distillation micro-batch.

The top-k cache removes exactly the teacher's forward pass from a training step, so at equal
arithmetic speed the live / cached step-time ratio is bounded by

    (teacher forward + student step on dense teacher logits) / (student step on the cached top-k)

counted in FLOPs. This module counts them with ``torch.utils.flop_counter.FlopCounterMode`` (matrix
products and attention; element-wise work such as softmax and norms is not counted) on real
quickstart micro-batches, for the quickstart's 4-layer student and a 2-layer one cut the same way,
then times the same three pieces in this process (1 torch thread, medians) to give each piece's
achieved GFLOP/s and the measured ratio beside the bound.

FLOPs are counted with eager attention (plain matmuls the counter sees); the timings use the models
as training loads them (PyTorch's fused attention kernel). Needs ``make quickstart-models``.

Run: ``make bench-flops`` (or ``python -m benchmarks.bench_flops [--batches N] [--repeats N]``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from pocl_core.config import load_config
from pocl_core.data import load_samples
from pocl_core.encoding import collate, encode_sample, pad_id_of
from pocl_core.losses.sparse import SparseTeacher
from pocl_core.model_prep import build_layer_subset_student
from pocl_core.models import load_causal_lm, load_tokenizer
from pocl_core.train_step import ResponseLogitsLM, distillation_losses

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart.yaml"
MODELS = REPO / ".cache" / "models"
TEACHER = MODELS / "smollm2-135m-instruct"
STUDENT_4L = MODELS / "smollm2-4l-student"


def micro_batches(cfg, n: int) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` micro-batches of the quickstart training file, encoded as training encodes them."""
    tokenizer = load_tokenizer(cfg.models.tokenizer_source)
    samples, _ = load_samples(REPO / cfg.data.train_path)
    size = cfg.optim.micro_batch_size
    encoded = [encode_sample(tokenizer, s, cfg.data.prompt_template, cfg.data.max_prompt_length, cfg.data.max_length)
               for s in samples[:n * size]]
    return [collate(encoded[i:i + size], pad_id_of(tokenizer)) for i in range(0, n * size, size)]


class Pieces:
    """The three pieces of a step on one micro-batch: teacher forward, student step (dense), student step (top-k)."""

    def __init__(self, teacher: torch.nn.Module, student_lm: torch.nn.Module, batch: dict[str, torch.Tensor],
                 cfg) -> None:
        if cfg.train.freeze_embeddings:
            student_lm.get_input_embeddings().weight.requires_grad_(False)
        self.teacher = ResponseLogitsLM(teacher).eval().requires_grad_(False)
        self.student = ResponseLogitsLM(student_lm)
        self.batch, self.cfg = batch, cfg
        with torch.no_grad():
            self.dense = self.teacher(batch["input_ids"], batch["attention_mask"], batch["target_mask"])
        self.sparse = SparseTeacher.from_logits(self.dense, cfg.scoring.teacher_cache_topk, temperatures=(1.5,))

    def teacher_forward(self) -> None:
        with torch.no_grad():
            self.teacher(self.batch["input_ids"], self.batch["attention_mask"], self.batch["target_mask"])

    def _student_step(self, teacher_logits) -> None:
        loss = self.cfg.loss
        out = distillation_losses(self.student, None, self.batch, temperature=1.5, kd_weight=0.85,
                                  loss_name=loss.name, loss_params=loss.params,
                                  vocab_columns=self.dense.shape[-1], teacher_logits=teacher_logits)
        out.total.backward()
        self.student.zero_grad(set_to_none=True)

    def student_dense(self) -> None:
        self._student_step(self.dense)

    def student_cached(self) -> None:
        self._student_step(self.sparse)

    def all(self) -> dict[str, Callable[[], None]]:
        return {"teacher forward": self.teacher_forward, "student step, dense teacher": self.student_dense,
                "student step, cached top-k": self.student_cached}


def count_flops(fn: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def median_seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(student_dir: Path, batches: list[dict[str, torch.Tensor]], cfg, repeats: int) -> dict[str, dict]:
    """FLOPs (eager attention) and median seconds (as trained) of each piece, summed over the micro-batches."""
    out: dict[str, dict] = {}
    for attn in ("eager", None):
        teacher, student = load_causal_lm(str(TEACHER)), load_causal_lm(str(student_dir))
        if attn:
            teacher.set_attn_implementation(attn)
            student.set_attn_implementation(attn)
        for batch in batches:
            for name, fn in Pieces(teacher, student, batch, cfg).all().items():
                row = out.setdefault(name, {"flops": 0, "seconds": 0.0})
                if attn:
                    row["flops"] += count_flops(fn)
                else:
                    row["seconds"] += median_seconds(fn, repeats)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=4, help="quickstart micro-batches measured (default 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per piece and micro-batch (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as each Ray worker)")
    args = parser.parse_args(argv)
    if not all((m / "config.json").is_file() for m in (TEACHER, STUDENT_4L)):
        raise SystemExit(f"quickstart models not found under {MODELS}: run `make quickstart-models` first")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(CONFIG, [f"models.teacher={TEACHER}", f"models.student={STUDENT_4L}"])
    batches = micro_batches(cfg, args.batches)
    tokens = sum(int(b["attention_mask"].numel()) for b in batches)
    targets = sum(int(b["target_mask"][:, 1:].sum()) for b in batches)
    print(f"{len(batches)} quickstart micro-batches of {cfg.optim.micro_batch_size}: {tokens} token positions "
          f"(padded), {targets} response tokens; loss {cfg.loss.name}, top-{cfg.scoring.teacher_cache_topk} cache, "
          f"{args.threads} torch thread(s)")
    scratch = Path(tempfile.mkdtemp(prefix="pocl-bench-flops-"))
    try:
        students = {"4-layer (quickstart)": STUDENT_4L,
                    "2-layer": build_layer_subset_student(TEACHER, scratch / "smollm2-2l-student", 2)}
        for label, folder in students.items():
            rows = measure(folder, batches, cfg, args.repeats)
            t, dense, cached = (rows[k] for k in ("teacher forward", "student step, dense teacher",
                                                  "student step, cached top-k"))
            print(f"\n{label} student")
            print(f"  {'piece':<30} {'GFLOP':>8} {'seconds':>8} {'GFLOP/s':>8}")
            for name, r in rows.items():
                print(f"  {name:<30} {r['flops'] / 1e9:>8.1f} {r['seconds']:>8.3f} {r['flops'] / 1e9 / r['seconds']:>8.1f}")
            bound = (t["flops"] + dense["flops"]) / cached["flops"]
            measured = (t["seconds"] + dense["seconds"]) / cached["seconds"]
            print(f"  live / cached: FLOP bound {bound:.2f}x, measured here {measured:.2f}x (goal >= 3x)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
