"""The scoring task: order independence, resume after a kill, stale inputs, the teacher cache, Ray."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import tasks.score as score_mod
from pocl_core.config import ConfigError, load_config
from pocl_core.contracts import RunPaths, StaleOutputError
from pocl_core.encoding import encode_sample
from pocl_core.models import TOKENIZER_FILES, load_causal_lm, load_tokenizer
from pocl_core.schedule import schedule_temperatures
from pocl_core.teacher_cache import TeacherCache
from tasks.distill import training_key
from tasks.load_data import load_dataset
from tasks.partition import partition
from tasks.score import cache_provenance, score_difficulty

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
BASE = ["data.max_train_samples=96", "scoring.shard_size=32", "scoring.batch_size=16"]


def config(tiny_models, runs_root: Path, data_path: Path, *overrides: str):
    return load_config(TINY_CONFIG, [f"models.teacher={tiny_models.teacher}", f"models.student={tiny_models.student}",
                                     f"data.train_path={data_path}", f"runs_root={runs_root}", *BASE, *overrides])


def run_scoring(cfg):
    data = load_dataset.fn(cfg)
    return data, score_difficulty.fn(cfg, data)


def tables(run_dir: Path, sub: str) -> dict[str, dict]:
    """Rows of every shard under run_dir/sub, by file name."""
    return {p.name: pq.read_table(p).to_pylist() for p in sorted((run_dir / sub).glob("part-*.parquet"))}


@pytest.fixture(scope="module")
def baseline(tiny_models, tiny_data_path, tmp_path_factory):
    """One uninterrupted in-process run: nll, teacher cache top-4, 3 shards of 32."""
    cfg = config(tiny_models, tmp_path_factory.mktemp("runs"), tiny_data_path, "run_name=base",
                 "scoring.teacher_cache_topk=4")
    data, result = run_scoring(cfg)
    return cfg, data, result


def test_scores_match_by_sample_id_after_shuffling_the_input(tiny_models, tiny_data_path, tmp_path):
    lines = tiny_data_path.read_text().splitlines()
    random.Random(0).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n")
    method = ["data.max_train_samples=48", "scoring.measures=[nll,rouge_l]", "scoring.fusion=rrf",
              "scoring.generation.max_new_tokens=8"]
    per_id = []
    for name, path in (("ordered", tiny_data_path), ("shuffled", shuffled)):
        cfg = config(tiny_models, tmp_path / "runs", path, f"run_name={name}", *method)
        _, result = run_scoring(cfg)
        rows = pq.read_table(sorted(Path(result.scores_dir).glob("part-*.parquet"))).to_pylist()
        per_id.append({r["sample_id"]: r for r in rows})
    assert len(per_id[0]) == 48 and per_id[0] == per_id[1]
    values = list(per_id[0].values())
    assert all(0.0 <= r["rouge_l"] <= 1.0 for r in values) and sorted(r["rank"] for r in values) == list(range(48))


def test_killed_run_resumes_only_missing_shards_and_equals_an_uninterrupted_run(
        baseline, tiny_models, tiny_data_path, tmp_path, monkeypatch):
    base_cfg, _, base_result = baseline
    cfg = config(tiny_models, tmp_path / "runs", tiny_data_path, "run_name=killed", "scoring.teacher_cache_topk=4")
    paths = RunPaths.of(cfg.run_dir)
    real = score_mod.score_shard
    calls: list[int] = []

    def dies_on_second_shard(cfg_, ctx, width, job, *args):
        calls.append(job.index)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(cfg_, ctx, width, job, *args)

    monkeypatch.setattr(score_mod, "score_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_scoring(cfg)
    assert calls == [0, 1]
    written = [paths.measures_shard(0), paths.teacher_cache_shard(0)]
    assert all(p.is_file() for p in written) and not paths.measures_shard(1).exists()
    assert not list(paths.scores_dir.glob("part-*.parquet")) and not list(paths.scores_dir.rglob("*.tmp"))
    mtimes = {p: p.stat().st_mtime_ns for p in written}

    calls.clear()
    monkeypatch.setattr(score_mod, "score_shard", lambda *a: calls.append(a[3].index) or real(*a))
    _, result = run_scoring(cfg)
    assert calls == [1, 2]
    assert {p: p.stat().st_mtime_ns for p in written} == mtimes
    base_dir = Path(base_cfg.run_dir)
    for sub in ("scores", "scores/measures", "teacher_cache"):
        assert tables(paths.root, sub) == tables(base_dir, sub), sub
    assert result.scores_key == base_result.scores_key and result.num_shards == 3

    calls.clear()  # a third run finds everything finished and computes nothing
    run_scoring(cfg)
    assert calls == []


def test_a_changed_dataset_is_refused_naming_file_and_key(baseline, tiny_models, tiny_data_path, tmp_path):
    cfg, _, _ = baseline
    other = load_dataset.fn(config(tiny_models, tmp_path / "runs", tiny_data_path, "run_name=other",
                                   "data.max_train_samples=80"))
    with pytest.raises(StaleOutputError, match=r"scores/part-00000\.parquet was produced from different inputs "
                                               r"\(dataset_fingerprint: found"):
        score_difficulty.fn(cfg, other)


def test_a_changed_model_is_refused_naming_file_and_key(baseline, tmp_path):
    cfg, data, _ = baseline
    changed = tmp_path / "teacher"
    shutil.copytree(cfg.models.teacher, changed)
    model = load_causal_lm(str(changed))
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(0.01)
    model.save_pretrained(changed, safe_serialization=True)
    moved = cfg.model_copy(update={"models": cfg.models.model_copy(update={"teacher": str(changed)})})
    with pytest.raises(StaleOutputError, match=r"scores/part-00000\.parquet .*scorer_fingerprint: found '[0-9a-f]+', "
                                               r"expected '[0-9a-f]+'"):
        score_difficulty.fn(moved, data)


def copy_tokenizer(source: str, dest: Path, **config_changes) -> Path:
    """The tokenizer files of ``source`` copied to ``dest``, with keys set in tokenizer_config.json."""
    dest.mkdir()
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, dest / name)
    if config_changes:
        settings = json.loads((dest / "tokenizer_config.json").read_text())
        (dest / "tokenizer_config.json").write_text(json.dumps({**settings, **config_changes}))
    return dest


def test_a_changed_tokenizer_is_refused_and_changes_the_training_key(baseline, tmp_path):
    cfg, data, result = baseline
    part = partition.fn(cfg, result)

    def with_tokenizer(folder: Path):
        return cfg.model_copy(update={"models": cfg.models.model_copy(update={"tokenizer": str(folder)})})

    same = with_tokenizer(copy_tokenizer(cfg.models.student, tmp_path / "same"))
    changed = with_tokenizer(copy_tokenizer(cfg.models.student, tmp_path / "changed", model_max_length=77))
    # The same files elsewhere: the scores are reused and the training key is unchanged.
    assert score_difficulty.fn(same, data).scores_key == result.scores_key
    assert training_key(same, data, part) == training_key(cfg, data, part)
    # Other tokenizer files: the scores are stale and the training key differs.
    with pytest.raises(StaleOutputError, match=r"scores/part-00000\.parquet .*measurer\.tokenizer: found "
                                               r"'[0-9a-f]+', expected '[0-9a-f]+'"):
        score_difficulty.fn(changed, data)
    assert training_key(changed, data, part) != training_key(cfg, data, part)


def test_a_moved_checkout_reuses_the_run(baseline, tmp_path):
    """The same models and data under other paths (another checkout or host, e.g. a container at
    /opt/pocl): data, scores and cache are reused and the training key holds; inputs enter by content."""
    cfg, data, result = baseline
    part = partition.fn(cfg, result)
    moved = {name: shutil.copytree(getattr(cfg.models, name), tmp_path / name) for name in ("teacher", "student")}
    data_file = tmp_path / "data" / Path(cfg.data.train_path).name
    data_file.parent.mkdir()
    shutil.copyfile(cfg.data.train_path, data_file)
    other = load_config(TINY_CONFIG, [f"models.teacher={moved['teacher']}", f"models.student={moved['student']}",
                                      f"data.train_path={data_file}", f"runs_root={cfg.runs_root}", *BASE,
                                      "run_name=base", "scoring.teacher_cache_topk=4"])
    written = {p: p.stat().st_mtime_ns for p in Path(cfg.run_dir).rglob("*.parquet")}
    again = load_dataset.fn(other)
    assert again.train_fingerprint == data.train_fingerprint
    assert score_difficulty.fn(other, again).scores_key == result.scores_key
    assert {p: p.stat().st_mtime_ns for p in Path(cfg.run_dir).rglob("*.parquet")} == written  # nothing redone
    assert training_key(other, again, part) == training_key(cfg, data, part)


def test_a_changed_cache_setting_is_refused_naming_the_cache_shard(baseline):
    cfg, data, _ = baseline
    other = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"teacher_cache_topk": 6})})
    with pytest.raises(StaleOutputError, match=r"teacher_cache/part-00000\.parquet .*topk: found 4, expected 6"):
        score_difficulty.fn(other, data)


def test_teacher_cache_reproduces_a_direct_teacher_forward(baseline):
    cfg, data, result = baseline
    cache = TeacherCache.load(result.teacher_cache_dir, expected=cache_provenance(cfg, data))
    assert len(cache) == data.num_train == 96 and cache.k == 4
    tokenizer = load_tokenizer(cfg.models.student)
    teacher = load_causal_lm(cfg.models.teacher).eval()
    samples = {s["sample_id"]: s for s in pq.read_table(data.train_path).to_pylist()}
    from pocl_core.data import Sample

    for sid in sorted(samples)[::20]:
        enc = encode_sample(tokenizer, Sample(**samples[sid]), cfg.data.prompt_template, cfg.data.max_prompt_length,
                            cfg.data.max_length)
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([enc.input_ids])).logits[0, enc.n_prompt - 1:-1]
        values, ids = logits[:, :len(tokenizer)].topk(4)
        got = cache.sparse_for([sid], "cpu", n_positions=[enc.n_response])
        assert torch.equal(got.topk_ids, ids), sid
        torch.testing.assert_close(got.topk_logits, values, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.lse, logits[:, :len(tokenizer)].logsumexp(-1), rtol=0, atol=1e-5)
        # the tail at every temperature of the schedule: logsumexp of logits / T outside the top-4
        rest = logits[:, :len(tokenizer)].scatter(-1, ids, float("-inf"))
        for j, t in enumerate(cache.temperatures):
            torch.testing.assert_close(got.tail_lse[:, j], (rest / t).logsumexp(-1), rtol=0, atol=1e-5)
    meta = json.loads(json.dumps(cache.metadata))
    assert meta["vocab_columns"] == len(tokenizer) and meta["scorer_dtype"] == "float32"
    assert cache.temperatures == schedule_temperatures(cfg.curriculum) and len(cache.temperatures) > 1


def test_the_cache_is_its_recorded_shards_not_every_file_left_in_its_folder(baseline, tmp_path):
    """A shard left over from an earlier pass with more shards (data.max_train_samples lowered) is
    neither loaded for training nor part of the training key; a missing shard is named."""
    from pocl_core.teacher_cache import cache_shards
    from tasks.distill import _cache_fingerprint

    _, _, result = baseline
    folder = tmp_path / "cache"
    shutil.copytree(result.teacher_cache_dir, folder)
    assert [p.name for p in cache_shards(folder)] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    before = _cache_fingerprint(folder)
    shutil.copy(folder / "part-00000.parquet", folder / "part-00003.parquet")  # the same ids again
    assert len(TeacherCache.load(folder)) == 96
    assert _cache_fingerprint(folder) == before
    (folder / "part-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="has 3 shards but part-00001.parquet is missing"):
        TeacherCache.load(folder)


def test_temperatures_the_cache_already_stores_reuse_it_and_new_shards_match(tiny_models, tiny_data_path, tmp_path):
    cfg = config(tiny_models, tmp_path, tiny_data_path, "run_name=temps", "scoring.teacher_cache_topk=4")
    data, result = run_scoring(cfg)
    stored = TeacherCache.load(result.teacher_cache_dir).temperatures
    assert len(stored) == 4
    paths = RunPaths.of(cfg.run_dir)
    paths.teacher_cache_shard(1).unlink()  # as if killed before this shard
    written = paths.teacher_cache_shard(0).stat().st_mtime_ns
    fewer = cfg.model_copy(update={"curriculum": cfg.curriculum.model_copy(update={"num_stages": 2})})
    score_difficulty.fn(fewer, data)  # temperatures 1 and 2: stored, so reused, not refused
    assert paths.teacher_cache_shard(0).stat().st_mtime_ns == written
    cache = TeacherCache.load(result.teacher_cache_dir)  # the rebuilt shard stores the same four
    assert cache.temperatures == stored and len(cache) == data.num_train
    cache.check_temperatures([1.0, 2.0])


def test_nan_teacher_logits_are_refused_naming_the_sample(tiny_models, tiny_data_path, tmp_path, monkeypatch):
    import tasks.score as score_mod

    real = score_mod.score_batch

    def nan_logits(*args, **kwargs):
        result = real(*args, **kwargs)
        result.cache[0][2][0] = float("nan")
        return result

    monkeypatch.setattr(score_mod, "score_batch", nan_logits)
    cfg = config(tiny_models, tmp_path, tiny_data_path, "run_name=nan", "scoring.teacher_cache_topk=4")
    with pytest.raises(ValueError, match=r"the teacher's logits are NaN for sample '.+' \(shard 0\)"):
        run_scoring(cfg)
    assert not RunPaths.of(cfg.run_dir).teacher_cache_shard(0).exists()


def test_a_nan_measure_is_refused_before_its_shard_is_written(tiny_models, tiny_data_path, tmp_path, monkeypatch):
    """A NaN saved in a finished shard would fail every later fusion, and a rerun would reuse the shard."""
    import tasks.score as score_mod

    real = score_mod.score_batch

    def nan_nll(*args, **kwargs):
        result = real(*args, **kwargs)
        result.values["nll"][-1] = float("nan")
        return result

    monkeypatch.setattr(score_mod, "score_batch", nan_nll)
    cfg = config(tiny_models, tmp_path, tiny_data_path, "run_name=nan-nll")
    with pytest.raises(ValueError, match=r"measure 'nll' is NaN for sample '.+' \(shard 0, scoring model .+ in "
                                         r"float32\); check models.teacher_dtype"):
        run_scoring(cfg)
    assert not RunPaths.of(cfg.run_dir).measures_shard(0).exists()


def test_changed_temperatures_are_refused_naming_the_cache_shard(baseline):
    cfg, data, _ = baseline
    other = cfg.model_copy(update={"curriculum": cfg.curriculum.model_copy(update={"temperature_end": 3.0})})
    with pytest.raises(StaleOutputError, match=r"teacher_cache/part-00000\.parquet .*temperatures"):
        score_difficulty.fn(other, data)


def test_cache_with_a_student_scorer_is_a_config_error(tiny_models, tiny_data_path, tmp_path):
    with pytest.raises(ConfigError, match=r"scoring.teacher_cache_topk \(8\).*scoring.model is 'student'"):
        config(tiny_models, tmp_path, tiny_data_path, "scoring.model=student", "scoring.teacher_cache_topk=8")
    with pytest.raises(ConfigError, match="scoring.num_workers"):
        config(tiny_models, tmp_path, tiny_data_path, "scoring.num_workers=0")


def test_a_cache_top_k_wider_than_the_vocabulary_is_refused_before_any_shard(tiny_models, tiny_data_path, tmp_path):
    cfg = config(tiny_models, tmp_path, tiny_data_path, "run_name=wide", "scoring.teacher_cache_topk=1000000")
    with pytest.raises(ConfigError, match=r"scoring.teacher_cache_topk=1000000 is more than the \d+ vocabulary "
                                          r"columns of .+teacher: use at most \d+"):
        run_scoring(cfg)
    assert not RunPaths.of(cfg.run_dir).measures_shard(0).exists()


@pytest.mark.slow
def test_ray_scoring_with_two_workers_equals_in_process(baseline, local_ray, tiny_models, tiny_data_path, tmp_path):
    base_cfg, _, base_result = baseline
    cfg = config(tiny_models, tmp_path / "runs", tiny_data_path, "run_name=ray", "scoring.teacher_cache_topk=4",
                 "scoring.num_workers=2")
    _, result = run_scoring(cfg)
    assert result.scores_key == base_result.scores_key
    for sub in ("scores", "scores/measures", "teacher_cache"):
        got, want = tables(Path(cfg.run_dir), sub), tables(Path(base_cfg.run_dir), sub)
        assert list(got) == list(want) == [f"part-{i:05d}.parquet" for i in range(3)], sub
        for name in want:
            for g, w in zip(got[name], want[name]):
                assert g.keys() == w.keys() and g["sample_id"] == w["sample_id"]
                for key in w:
                    if isinstance(w[key], (float, list)) and key != "topk_ids":
                        np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-5, err_msg=f"{sub}/{name} {key}")
                    else:
                        assert g[key] == w[key], f"{sub}/{name} {key}"


def test_a_teacher_with_another_tokenizer_is_refused_before_the_scoring_pass(tiny_models, tiny_data_path, tmp_path):
    """Training would refuse it only after the whole teacher pass (and its cache) was spent."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_models.teacher, teacher)
    tokenizer = load_tokenizer(str(teacher))
    tokenizer.add_tokens(["<an-extra-token>"])
    tokenizer.save_pretrained(str(teacher))
    cfg = config(tiny_models, tmp_path, tiny_data_path, "run_name=mismatch", f"models.teacher={teacher}")
    with pytest.raises(ConfigError, match=r"models.teacher .+ / models.student .+: teacher and student tokenizers "
                                          r"differ in size \(\d+ vs \d+ tokens\)"):
        run_scoring(cfg)
    assert not RunPaths.of(cfg.run_dir).measures_shard(0).exists()


def test_greedy_rouge_l_scores_depend_on_no_sampling_setting(tiny_models, tiny_data_path, tmp_path):
    """Greedy decoding reads no sampling setting, so changing one does not make its scores stale;
    with sampling on, each one counts."""
    from tasks.load_data import DatasetSplits
    from tasks.score import scoring_provenance

    data = DatasetSplits(str(tiny_data_path), str(tiny_data_path), "fp", "", 1, 0)

    def provenance(*overrides: str) -> dict:
        cfg = config(tiny_models, tmp_path, tiny_data_path, "scoring.measures=[nll, rouge_l]", *overrides)
        return scoring_provenance(cfg, data)["measurer"]

    greedy = "scoring.generation.do_sample=false"
    assert provenance(greedy) == provenance(greedy, "scoring.generation.temperature=0.7",
                                            "scoring.generation.top_k=5", "scoring.generation.seed=3")
    assert provenance(greedy) != provenance(greedy, "scoring.generation.max_new_tokens=9")
    assert provenance() != provenance("scoring.generation.temperature=0.7")
    assert provenance()["generation"] == load_config(TINY_CONFIG).scoring.generation.model_dump(mode="json")


def test_single_fusion_over_several_measures_warns_and_follows_the_first(tiny_models, tiny_data_path, tmp_path,
                                                                           caplog):
    """fusion=single with [nll, rouge_l]: both are computed and stored, the ranks follow nll alone, and
    a warning says so (rouge_l costs a generation per sample)."""
    cfg = config(tiny_models, tmp_path, tiny_data_path, "data.max_train_samples=16", "scoring.measures=[nll,rouge_l]",
                 "scoring.fusion=single", "scoring.generation.max_new_tokens=4")
    with caplog.at_level("WARNING", logger="pocl"):
        _, result = run_scoring(cfg)
    warned = [r.getMessage() for r in caplog.records if "scoring.fusion=single" in r.getMessage()]
    assert warned == ["scoring.fusion=single: the curriculum follows nll alone; rouge_l are computed and stored but "
                      "do not order it (scoring.fusion=rrf fuses them all)"]
    rows = pq.read_table(sorted(Path(result.scores_dir).glob("part-*.parquet"))).to_pylist()
    by_nll = sorted(rows, key=lambda r: (r["nll"], r["sample_id"]))
    assert [r["rank"] for r in by_nll] == list(range(len(rows))) and len({r["rouge_l"] for r in rows}) > 1
