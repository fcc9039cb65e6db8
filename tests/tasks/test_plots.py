"""The run's PNG plots: drawn without pyplot, so from several threads at once and without touching the
process's matplotlib backend."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from pocl_core.storage import location
from tasks.plots import plot_eval, plot_stage_rouge, plot_training

TRAIN_ROWS = [{"global_step": s, "stage": s // 3, "loss": 3.0 - 0.1 * s, "temperature": 1.0 + 0.25 * (s // 3)}
              for s in range(9)]
EVAL = [
    {"model": "teacher", "rouge_l": 40.0, "rouge_l_std": 1.0, "rouge_l_greedy": 42.0, "nll": 1.2, "stage": None},
    {"model": "initial_student", "rouge_l": 10.0, "rouge_l_std": 0.5, "rouge_l_greedy": 11.0, "nll": 3.0, "stage": None},
    {"model": "stage_0", "rouge_l": 15.0, "rouge_l_std": 0.7, "rouge_l_greedy": 16.0, "nll": 2.5, "stage": 0},
    {"model": "final_student", "rouge_l": 25.0, "rouge_l_std": 0.9, "rouge_l_greedy": 26.0, "nll": 2.0, "stage": None},
]


def _draw_all(folder) -> list:
    return [plot_training(TRAIN_ROWS, location(folder / "train.png")),
            plot_eval(EVAL, location(folder / "eval.png")),
            plot_stage_rouge(EVAL, location(folder / "stages.png"))]


def test_plots_from_threads_at_once_equal_the_same_plots_drawn_alone(tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    expected = [p.read_bytes() for p in _draw_all(alone)]
    folders = [tmp_path / f"t{i}" for i in range(6)]
    for f in folders:
        f.mkdir()
    with ThreadPoolExecutor(max_workers=6) as pool:
        drawn = list(pool.map(_draw_all, folders))
    for outs in drawn:
        got = [p.read_bytes() for p in outs]
        assert all(g.startswith(b"\x89PNG\r\n\x1a\n") for g in got)
        assert got == expected  # no figure drew into another's canvas


def test_the_training_plot_gives_each_stage_its_own_colour(tmp_path):
    path = plot_training(TRAIN_ROWS, location(tmp_path / "train.png"))
    pixels = np.asarray(Image.open(str(path)).convert("RGB"))
    colours = {tuple(int(c) for c in px) for px in pixels.reshape(-1, 3)}
    # viridis resampled to 3 stages: dark purple, teal, yellow are all drawn
    from matplotlib import colormaps
    stage_colours = [tuple(round(255 * c) for c in colormaps["viridis"].resampled(3)(i)[:3]) for i in range(3)]
    for colour in stage_colours:
        assert any(max(abs(a - b) for a, b in zip(colour, px)) <= 2 for px in colours), colour


def test_importing_the_plots_leaves_the_matplotlib_backend_alone():
    code = ("import matplotlib; matplotlib.use('svg'); import tasks.plots, tasks.report; "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"
