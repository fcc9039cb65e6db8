"""PNG plots of a run (matplotlib, Agg backend): training curves and held-out scores."""

from __future__ import annotations

import base64
import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pocl_core.contracts import write_bytes_atomic  # noqa: E402
from pocl_core.storage import Location, location  # noqa: E402


def plot_training(rows: Sequence[dict], out: Location) -> Location:
    """Loss per logged step, coloured by stage, with the stage temperature on a second axis."""
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    stages = sorted({r["stage"] for r in rows})
    cmap = plt.get_cmap("viridis", max(len(stages), 2))
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
    return _save(fig, out)


def plot_eval(metrics: Sequence[dict], out: Location) -> Location:
    """ROUGE-L (bars, ± std over seeds) and NLL (annotated) per evaluated model."""
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    names = [m["model"] for m in metrics]
    bars = ax.bar(names, [m["rouge_l"] for m in metrics], yerr=[m["rouge_l_std"] for m in metrics],
                  color=["tab:gray", "tab:orange", "tab:green", "tab:blue", "tab:purple"][: len(names)], capsize=4)
    for bar, m in zip(bars, metrics):
        ax.annotate(f"NLL {m['nll']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel("held-out ROUGE-L (×100)")
    ax.set_title("Before and after distillation")
    return _save(fig, out)


def _save(fig, out: Location) -> Location:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_bytes_atomic(out, buf.getvalue())


def png_data_uri(path: str | Location) -> str:
    """The PNG (a local file or an object) as a data: URI, for embedding in a Prefect markdown artifact."""
    return "data:image/png;base64," + base64.b64encode(location(path).read_bytes()).decode()
