"""PNG plots of a run (matplotlib's object API on an Agg canvas): training curves and held-out scores.

No pyplot: its global figure registry is not thread-safe (task runs may share a process's threads),
and importing this module leaves the process's matplotlib backend as it was.
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pocl_core.contracts import write_bytes_atomic
from pocl_core.storage import Location, location


def figure(width: float, height: float, dpi: int = 110) -> tuple[Figure, Axes]:
    """A figure of ``width`` × ``height`` inches at ``dpi`` on its own Agg canvas, and its one axes."""
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def plot_training(rows: Sequence[dict], out: Location) -> Location:
    """Loss per logged step, coloured by stage, with the stage temperature on a second axis."""
    fig, ax = figure(7, 3.6)
    stages = sorted({r["stage"] for r in rows})
    cmap = colormaps["viridis"].resampled(max(len(stages), 2))
    for i, s in enumerate(stages):
        pts = [r for r in rows if r["stage"] == s]
        ax.plot([r["global_step"] for r in pts], [r["loss"] for r in pts], marker=".", color=cmap(i), label=f"stage {s}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (1−λ)·CE + λ·KD")
    twin = ax.twinx()
    twin.step([r["global_step"] for r in rows], [r["temperature"] for r in rows], where="post", color="tab:red",
              alpha=0.6, linestyle="--", label="temperature")
    twin.set_ylabel("temperature T", color="tab:red")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Distillation loss by stage")
    return save_png(fig, out)


def plot_eval(metrics: Sequence[dict], out: Location) -> Location:
    """ROUGE-L (bars, ± std over seeds; greedy as a marker when present) and NLL (annotated) per model."""
    fig, ax = figure(max(6.0, 1.1 * len(metrics)), 3.4)
    names = [m["model"] for m in metrics]
    cmap = colormaps["tab10"]
    bars = ax.bar(names, [m["rouge_l"] for m in metrics], yerr=[m["rouge_l_std"] for m in metrics],
                  color=[cmap(i % 10) for i in range(len(names))], capsize=4, label="sampled")
    greedy = [(n, m["rouge_l_greedy"]) for n, m in zip(names, metrics) if m.get("rouge_l_greedy") is not None]
    if greedy:
        ax.scatter([n for n, _ in greedy], [g for _, g in greedy], marker="D", color="black", zorder=3, label="greedy")
        ax.legend(fontsize=8)
    for bar, m in zip(bars, metrics):
        ax.annotate(f"NLL {m['nll']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel("held-out ROUGE-L (×100)")
    ax.set_title("Before and after distillation")
    ax.tick_params(axis="x", labelsize=8)
    return save_png(fig, out)


def plot_stage_rouge(metrics: Sequence[dict], out: Location) -> Location:
    """Student ROUGE-L across the curriculum: initial, after each evaluated stage, final."""
    by_name = {m["model"]: m for m in metrics}
    staged = sorted((m for m in metrics if m.get("stage") is not None), key=lambda m: m["stage"])
    points = [("initial", by_name.get("initial_student"))] + [(f"stage {m['stage']}", m) for m in staged] + \
        [("final", by_name.get("final_student"))]
    points = [(label, m) for label, m in points if m is not None]
    fig, ax = figure(6, 3.4)
    x = list(range(len(points)))
    ax.errorbar(x, [m["rouge_l"] for _, m in points], yerr=[m["rouge_l_std"] for _, m in points], marker="o",
                capsize=4, label="sampled")
    if all(m.get("rouge_l_greedy") is not None for _, m in points):
        ax.plot(x, [m["rouge_l_greedy"] for _, m in points], marker="D", linestyle="--", label="greedy")
    if "teacher" in by_name:
        ax.axhline(by_name["teacher"]["rouge_l"], color="tab:gray", linestyle=":", label="teacher (sampled)")
    ax.set_xticks(x, [label for label, _ in points])
    ax.set_ylabel("held-out ROUGE-L (×100)")
    ax.set_title("Student through the curriculum")
    ax.legend(fontsize=8)
    return save_png(fig, out)


def save_png(fig: Figure, out: Location) -> Location:
    """Lay ``fig`` out tightly and write it to ``out`` as a PNG, atomically."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return write_bytes_atomic(out, buf.getvalue())


def png_data_uri(path: str | Location) -> str:
    """The PNG (a local file or an object) as a data: URI, for embedding in a Prefect markdown artifact."""
    return "data:image/png;base64," + base64.b64encode(location(path).read_bytes()).decode()
