"""`pocl compare`: variants share one scoring pass and end in a mean ± std table."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.compare import Variant, plan_variants, render_comparison, summarize, variant_config
from pocl_core.config import ConfigError, load_config
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.slow


def test_variant_config_sets_strategy_loss_and_seed(tmp_path):
    base = load_config(TINY_CONFIG)
    cfg = variant_config(base, tmp_path, Variant("none", "rkl", 20))
    assert (cfg.curriculum.strategy, cfg.loss.name, cfg.seed, cfg.curriculum.shuffle_seed) == ("none", "rkl", 20, 20)
    assert cfg.run_dir == str(tmp_path / "none-rkl-s20")
    assert cfg.optim == base.optim and cfg.models == base.models


def test_every_variant_is_checked_before_any_compute():
    base = load_config(TINY_CONFIG)
    assert [v.name for v in plan_variants(base, ["curriculum", "none"], ["fkl", "rkl"], [10])] == [
        "curriculum-fkl-s10", "none-fkl-s10", "curriculum-rkl-s10", "none-rkl-s10"]
    with pytest.raises(ConfigError, match=r"(?s)variant curriculum-fkll-s10.*unknown KD loss 'fkll'"):
        plan_variants(base, None, ["fkl", "fkll"], None)


def test_summarize_mean_and_std_over_seeds():
    rows = [{"strategy": "curriculum", "loss": "fkl", "seed": s, "rouge_l": r, "rouge_l_greedy": g, "nll": n}
            for s, r, g, n in ((1, 10.0, 20.0, 2.0), (2, 12.0, 26.0, 4.0))]
    rows.append({"strategy": "none", "loss": "fkl", "seed": 1, "rouge_l": 5.0, "rouge_l_greedy": None, "nll": 1.0})
    curriculum, plain = summarize(rows)
    assert curriculum["rouge_l_mean"] == 11.0 and curriculum["nll_mean"] == 3.0
    assert curriculum["rouge_l_std"] == pytest.approx(2 ** 0.5) and curriculum["seeds"] == 2
    assert curriculum["rouge_l_greedy_mean"] == 23.0 and curriculum["rouge_l_greedy_std"] == pytest.approx(18 ** 0.5)
    assert plain["rouge_l_greedy_mean"] is None and plain["rouge_l_std"] == 0.0
    text = render_comparison("c", [{"model": "teacher", "rouge_l": 30.0, "rouge_l_greedy": None, "nll": 1.5}],
                             [curriculum, plain], "pocl compare")
    assert "| fkl | curriculum | 2 | 11.00 ± 1.41 | 23.00 ± 4.24 | 3.000 ± 1.414 |" in text
    assert "| fkl | none | 1 | 5.00 ± 0.00 | – | 1.000 ± 0.000 |" in text and "| teacher | 30.00 | – | 1.500 |" in text


def test_compare_flow_shares_scoring_and_tabulates(prefect_harness, make_config, tmp_path):
    from flows.compare import pocl_compare

    # ray.num_workers=0: Ray Train's local mode; this test is about the comparison, the Ray tests are elsewhere.
    cfg = make_config()
    overrides = [f"models.teacher={cfg.models.teacher}", f"models.student={cfg.models.student}",
                 f"data.train_path={cfg.data.train_path}", f"runs_root={tmp_path}", "ray.num_workers=0",
                 "curriculum.num_stages=2", "data.max_train_samples=96", "eval.max_new_tokens=8"]
    out = Path(pocl_compare(config_path=str(TINY_CONFIG), overrides=overrides, strategies=["curriculum", "none"],
                            losses=["fkl"], seeds=[10], compare_name="cmp"))
    root = tmp_path / "cmp"
    assert out == root / "comparison.md"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["curriculum-fkl-s10", "none-fkl-s10", "shared"]
    assert list((root / "shared" / "scores").glob("part-*.parquet"))
    assert not (root / "curriculum-fkl-s10" / "scores").exists()  # scoring ran once, in shared/
    for v in ("curriculum-fkl-s10", "none-fkl-s10"):
        assert (root / v / "student" / "model.safetensors").is_file()
        assert (root / v / "partition.parquet").is_file()
    text = out.read_text()
    assert "| fkl | curriculum | 1 |" in text and "| fkl | none | 1 |" in text and "initial_student" in text
