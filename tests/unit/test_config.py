import textwrap

import pytest
import yaml

from pocl_core.config import ConfigError, load_config, parse_overrides
from tests.conftest import TINY_CONFIG


def test_tiny_config_loads_and_run_dir_joins_root_and_name():
    cfg = load_config(TINY_CONFIG, ["run_name=demo", "runs_root=/some/dir", "curriculum.num_stages=3"])
    assert cfg.run_dir == "/some/dir/demo"
    assert cfg.curriculum.num_stages == 3
    assert cfg.models.trust_remote_code is False


def test_override_values_are_parsed_as_yaml():
    assert parse_overrides(["a.b=3", "c=true", "d=[1, 2]", "e=text", "f=0.5"]) == [
        ("a.b", 3), ("c", True), ("d", [1, 2]), ("e", "text"), ("f", 0.5)]


@pytest.mark.parametrize("override, key", [
    ("curriculum.num_stagez=3", "curriculum.num_stagez"),
    ("nonsense=1", "nonsense"),
    ("optim.lrr=1", "optim.lrr"),
])
def test_unknown_keys_are_named(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_CONFIG, [override])
    assert key in str(err.value) and "unknown key" in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("curriculum.num_stages=0", "curriculum.num_stages"),
    ("optim.lr=-1", "optim.lr"),
    ("data.eval_fraction=1.5", "data.eval_fraction"),
    ("ray.num_workers=-2", "ray.num_workers"),
    ("curriculum.strategy=sideways", "curriculum.strategy"),
    ("run_name=has/slash", "run_name"),
    ("run_name=" + "a" * 129, "run_name"),  # a file name's limit is 255 bytes; the run adds suffixes
    ("seed=-1", "seed"),
    ("curriculum.shuffle_seed=99999999999999999999", "curriculum.shuffle_seed"),  # torch: "Overflow"
    ("eval.seeds=[1, -2]", "eval.seeds"),
    ("runs_root=s3:/bucket/x", "s3://bucket/x"),  # would be the local folder ./s3:/bucket/x
    ("runs_root=file:/tmp/x", "(file:///tmp/x)"),  # file://tmp/x would name the host 'tmp'
    ("scoring.generation.seed=-3", "scoring.generation.seed"),
    ("loss.name=fkll", "unknown KD loss 'fkll'; valid names: fkl"),
    ("loss.params={bogus: 1}", "got unknown parameter(s) 'bogus'"),
    ("scoring.measures=[nll, bleu]", "scoring.measures: unknown measure(s) 'bleu'; available: nll, rouge_l"),
    ("data.eval_fraction=0", "data.eval_fraction is 0 and there is no data.eval_path"),
    ("optim.min_lr=0.5", "optim.min_lr (0.5) is above optim.lr"),
    ("runs_root=", "runs_root"),
    ("data.train_path=", "data.train_path"),
    ("models.teacher=", "models.teacher"),
    ("curriculum.num_stages=true", "curriculum.num_stages: Input should be a valid integer"),  # no bool -> 1
    ("ray.use_gpu=1", "ray.use_gpu: Input should be a valid boolean"),
])
def test_out_of_range_values_are_named(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_CONFIG, [override])
    assert key in str(err.value)


def test_exponent_floats_merge_keys_and_odd_keys_in_config_files(tmp_path):
    """YAML 1.1 reads 1e-4 as text; the config reads it as the number it means (strict types would refuse
    text). Anchors and merge keys still work; a list as a key is a clear error."""
    cfg = load_config(TINY_CONFIG, ["optim.lr=1e-4", "optim.min_lr=1E-6", "curriculum.temperature_end=2e0"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.curriculum.temperature_end) == (1e-4, 1e-6, 2.0)
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent("""
        models: {teacher: a, student: b}
        data: {train_path: x.jsonl}
        optim: &optim {lr: 3e-4, min_lr: 1e-6}
        loss: {name: jsd, params: {beta: 5e-1}}
    """))
    cfg = load_config(p)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.loss.params) == (3e-4, 1e-6, {"beta": 0.5})
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b {teacher: a, student: b}\nmodels:\n  <<: *b\n  student: c\ndata: {train_path: x}\n")
    with pytest.raises(ConfigError, match="base: unknown key"):  # the anchor's own section is not a config key
        load_config(merged)
    merged.write_text("models:\n  <<: {teacher: a, student: b}\n  student: c\ndata: {train_path: x}\n")
    assert load_config(merged).models.student == "c"
    odd = tmp_path / "odd.yaml"
    odd.write_text("? [1, 2]\n: x\n")
    with pytest.raises(ConfigError, match="odd.yaml: not valid YAML: a key must be a plain value, not a list"):
        load_config(odd)


def test_text_settings_keep_their_text_and_other_values_are_yaml():
    assert parse_overrides(["run_name=007", "run_name=on", "models.tokenizer=null", "data.prompt_template=Q: {prompt}",
                            "run_name='x y'"]) == [
        ("run_name", "007"), ("run_name", "on"), ("models.tokenizer", None), ("data.prompt_template", "Q: {prompt}"),
        ("run_name", "x y")]
    assert load_config(TINY_CONFIG, ["run_name=007", "loss.name=jsd", "loss.params={beta: 0.5}"]).run_name == "007"
    with pytest.raises(ConfigError, match="'beta'=1.5 must lie in"):
        load_config(TINY_CONFIG, ["loss.name=jsd", "loss.params={beta: 1.5}"])


def test_null_words_mean_null_for_every_setting_and_quoted_they_are_text():
    words = ["null", "Null", "NULL", "~", "None", " None "]
    assert parse_overrides([f"models.tokenizer={w}" for w in words]) == [("models.tokenizer", None)] * len(words)
    assert parse_overrides(["ray.address=None", "data.max_train_samples=None"]) == [
        ("ray.address", None), ("data.max_train_samples", None)]
    assert parse_overrides(["run_name='None'", 'models.tokenizer="null"', "run_name=Nonesuch"]) == [
        ("run_name", "None"), ("models.tokenizer", "null"), ("run_name", "Nonesuch")]
    cfg = load_config(TINY_CONFIG, ["models.tokenizer=None", "data.max_train_samples=None"])
    assert cfg.models.tokenizer is None and cfg.data.max_train_samples is None


@pytest.mark.parametrize("override, message", [
    ("curriculum.temperature_end=.inf", "curriculum.temperature_end: Input should be a finite number"),
    ("curriculum.temperatures=[1, 2, 3, .nan]", "curriculum.temperatures.3: Input should be a finite number"),
    ("optim.lr=.nan", "optim.lr: Input should be a finite number"),
    ("eval.temperature=-.inf", "eval.temperature: Input should be a finite number"),
    ("storage.model_cache_dir=s3://bucket/cache", "storage.model_cache_dir s3://bucket/cache must be a local folder"),
    ("scoring.measures=[1]", 'scoring.measures.0: Input should be a valid string: YAML read the unquoted value as int '
                             '1; quote it to keep the text, in scoring.measures, write "1"'),
    ("run_name=nightly-{scheduled}", "{scheduled} is expanded only in `pocl run --run-name` and the flow's run_name"),
    (".seed=3", "override '.seed=3': the key '.seed' has an empty part"),
    ("curriculum..num_stages=3", "the key 'curriculum..num_stages' has an empty part"),
    ("run_name=None", "run_name: Input should be a valid string: null here (null, ~ or None); quote it for the text"),
    ("eval={do_sample: false, seeds: [1, 2]}", "eval.do_sample is false, so each of eval.seeds [1, 2] would decode "
                                               "the same greedy pass: give one seed (eval.seeds=[1])"),
])
def test_values_no_setting_means_are_refused_naming_the_setting(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_CONFIG, [override])
    assert message in str(err.value)


def test_a_section_left_empty_in_yaml_takes_its_defaults(tmp_path):
    tree = yaml.safe_load(TINY_CONFIG.read_text())
    tree["storage"] = None  # `storage:` with every key commented out
    tree["scoring"]["generation"] = None
    path = tmp_path / "empty-sections.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    assert cfg.storage == load_config(TINY_CONFIG, ["storage={}"]).storage
    assert cfg.scoring.generation.max_new_tokens == type(cfg.scoring.generation)().max_new_tokens
    tree["run_name"] = None  # not a section: still refused
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match="run_name"):
        load_config(path)


def test_cross_field_errors_name_both_keys():
    with pytest.raises(ConfigError, match=r"curriculum.temperatures.*num_stages"):
        load_config(TINY_CONFIG, ["curriculum.temperatures=[1.0, 2.0]"])
    with pytest.raises(ConfigError, match=r"global_batch_size.*ray.num_workers") as err:
        load_config(TINY_CONFIG, ["optim.global_batch_size=15"])
    assert "<root>" not in str(err.value) and "Value error" not in str(err.value)
    with pytest.raises(ConfigError, match=r"max_prompt_length"):
        load_config(TINY_CONFIG, ["data.max_prompt_length=200", "data.max_length=100"])
    with pytest.raises(ConfigError, match=r"parallel_strategy=fsdp shards .* ray.num_workers=0 trains in this process"):
        load_config(TINY_CONFIG, ["train.parallel_strategy=fsdp", "ray.num_workers=0"])
    with pytest.raises(ConfigError, match=r"autocast_dtype=float16 needs loss scaling.*use train.autocast_dtype=bfloat16"):
        load_config(TINY_CONFIG, ["train.parallel_strategy=fsdp", "train.autocast_dtype=float16"])
    assert load_config(TINY_CONFIG, ["train.parallel_strategy=fsdp", "train.autocast_dtype=bfloat16"])


def test_missing_required_section_and_bad_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent("""
        models: {teacher: a}
        data: {train_path: x.jsonl}
    """))
    with pytest.raises(ConfigError, match=r"models.student: required key is missing"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    p.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY_CONFIG, ["novalue"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(TINY_CONFIG, ["seed.sub=1"])
    twice = tmp_path / "twice.yaml"
    twice.write_text("models: {teacher: a, student: b}\ndata: {train_path: x}\ncurriculum: {num_stages: 3}\n"
                     "curriculum: {num_stages: 2}\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: key 'curriculum' appears twice(?s:.*)"
                                          r'in ".*twice.yaml", line 4'):
        load_config(twice)


def test_fingerprint_changes_with_the_section_it_covers():
    a = load_config(TINY_CONFIG)
    b = load_config(TINY_CONFIG, ["optim.lr=0.5"])
    assert a.fingerprint("data") == b.fingerprint("data")
    assert a.fingerprint("optim") != b.fingerprint("optim")


def test_training_key_depends_on_the_data_and_the_train_settings(monkeypatch):
    from types import SimpleNamespace

    import tasks.distill as distill_mod

    monkeypatch.setattr(distill_mod, "model_fingerprint", lambda p: "fp")
    monkeypatch.setattr(distill_mod, "read_metadata", lambda p: {"strategy": "curriculum"})
    cfg = load_config(TINY_CONFIG)
    key = distill_mod.training_key(cfg, SimpleNamespace(train_fingerprint="a"), "partition.parquet")
    assert key != distill_mod.training_key(cfg, SimpleNamespace(train_fingerprint="b"), "partition.parquet")
    frozen = load_config(TINY_CONFIG, ["train.freeze_embeddings=true"])
    assert key != distill_mod.training_key(frozen, SimpleNamespace(train_fingerprint="a"), "partition.parquet")
    logging_only = load_config(TINY_CONFIG, ["train.log_every_steps=3"])
    assert key == distill_mod.training_key(logging_only, SimpleNamespace(train_fingerprint="a"), "partition.parquet")
    # the T² rule is the default; the bare divergence trains other weights, so it is another key
    # a live teacher's dtype changes the training; float32 (the default) leaves the key as it was
    assert key != distill_mod.training_key(load_config(TINY_CONFIG, ["models.teacher_dtype=bfloat16"]),
                                           SimpleNamespace(train_fingerprint="a"), "partition.parquet")
    bare = load_config(TINY_CONFIG, ["loss.temperature_scaling=none"])
    assert key != distill_mod.training_key(bare, SimpleNamespace(train_fingerprint="a"), "partition.parquet")
    explicit = load_config(TINY_CONFIG, ["loss.temperature_scaling=t_squared"])
    assert key == distill_mod.training_key(explicit, SimpleNamespace(train_fingerprint="a"), "partition.parquet")


def test_temperature_scaling_accepts_only_the_two_rules():
    with pytest.raises(ConfigError, match="loss.temperature_scaling"):
        load_config(TINY_CONFIG, ["loss.temperature_scaling=t2"])


def test_every_setting_is_documented_in_its_sections_docstring():
    """Each knob of each config section is named in that section's docstring (the config reference)."""
    import inspect
    import re

    import pydantic

    import pocl_core.config as config
    import pocl_core.config_sections as sections
    import pocl_core.config_training as training

    models = [cls for mod in (config, sections, training) for cls in vars(mod).values()
              if inspect.isclass(cls) and issubclass(cls, pydantic.BaseModel) and cls.__module__ == mod.__name__]
    assert len(models) >= 10
    undocumented = []
    for cls in models:
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", inspect.getdoc(cls) or ""))
        for name, field in cls.model_fields.items():
            is_section = inspect.isclass(field.annotation) and issubclass(field.annotation, pydantic.BaseModel)
            if not is_section and name not in words:
                undocumented.append(f"{cls.__name__}.{name}")
    assert undocumented == []


def test_integers_read_as_yaml_1_2_in_overrides_and_files(tmp_path):
    """YAML 1.1 (PyYAML's default) reads 010 as octal 8 and 1:30 as base-60 90; a config means decimal."""
    cfg = load_config(TINY_CONFIG, ["seed=010", "curriculum.shuffle_seed=08", "eval.seeds=[010, 020]",
                                    "optim.global_batch_size=0x10", "train.log_every_steps=1_000"])
    assert (cfg.seed, cfg.curriculum.shuffle_seed, cfg.eval.seeds) == (10, 8, [10, 20])
    assert (cfg.optim.global_batch_size, cfg.train.log_every_steps) == (16, 1000)
    with pytest.raises(ConfigError, match=r"seed: Input should be a valid integer"):
        load_config(TINY_CONFIG, ["seed=1:30"])
    p = tmp_path / "c.yaml"
    p.write_text("seed: 012\nmodels: {teacher: a, student: b}\ndata: {train_path: x}\noptim: {lr: -1.5e-3}\n")
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(p)
    p.write_text("seed: +012\nmodels: {teacher: a, student: b}\ndata: {train_path: x}\n")
    assert load_config(p).seed == 12


def test_unreadable_config_files_and_an_untouched_base(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"run_name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 13: invalid continuation byte\)"):
        load_config(latin1)
    with pytest.raises(ConfigError, match="is a folder; give a YAML file"):
        load_config(tmp_path)
    base = {"models": {"teacher": "a", "student": "b"}, "data": {"train_path": "x", "max_length": 300}}
    assert load_config(base=base, overrides=["data.max_length=400"]).data.max_length == 400
    assert base["data"]["max_length"] == 300


def test_a_text_setting_yaml_read_as_a_number_date_or_bool_says_to_quote_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_name: 007\nmodels: {teacher: a, student: b}\ndata: {train_path: x, eval_path: no}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert ("run_name: Input should be a valid string: YAML read the unquoted value as int 7; quote it to keep the "
            'text, e.g. run_name: "..."') in str(err.value)
    assert "data.eval_path: Input should be a valid string: YAML read the unquoted value as bool False" in str(err.value)
    p.write_text("run_name: 2026-12-03\nmodels: {teacher: a, student: b}\ndata: {train_path: x}\n")
    with pytest.raises(ConfigError, match="YAML read the unquoted value as date 2026-12-03; quote it"):
        load_config(p)


def test_a_mapping_override_merges_into_its_section_and_replaces_free_form_mappings():
    """``optim={global_batch_size: 16}`` keeps the file's other optim settings (it replaced the section,
    silently resetting lr to its default); ``loss.params`` is the loss's own mapping: replaced whole."""
    base = load_config(TINY_CONFIG)
    cfg = load_config(TINY_CONFIG, ["optim={global_batch_size: 16}", "scoring={generation: {max_new_tokens: 5}}"])
    assert cfg.optim.global_batch_size == 16
    assert cfg.optim.model_dump(exclude={"global_batch_size"}) == base.optim.model_dump(exclude={"global_batch_size"})
    assert cfg.scoring.generation.max_new_tokens == 5
    assert cfg.scoring.generation.model_dump(exclude={"max_new_tokens"}) == \
        base.scoring.generation.model_dump(exclude={"max_new_tokens"})
    assert cfg.scoring.model_dump(exclude={"generation"}) == base.scoring.model_dump(exclude={"generation"})
    assert base.optim.lr != type(base.optim).model_fields["lr"].default  # the case that was lost
    switched = load_config(TINY_CONFIG, ["loss={name: srkl, params: {alpha: 0.3}}",
                                         "loss={name: akl, params: {mu: 0.6}}"])  # merged: akl would get alpha
    assert (switched.loss.name, switched.loss.params) == ("akl", {"mu": 0.6})
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(TINY_CONFIG, ["optim={lrr: 1}"])


def test_an_override_of_one_place_of_a_yaml_alias_leaves_the_others(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent("""
        models: {teacher: a, student: b}
        data: {train_path: x}
        scoring: {generation: &decode {temperature: 0.5, max_new_tokens: 8}}
        eval: *decode
    """))
    cfg = load_config(p, ["eval={temperature: 0.7}", "eval.max_new_tokens=4"])
    assert (cfg.eval.temperature, cfg.eval.max_new_tokens) == (0.7, 4)
    assert (cfg.scoring.generation.temperature, cfg.scoring.generation.max_new_tokens) == (0.5, 8)


def test_a_yaml_alias_that_contains_itself_is_a_config_error_naming_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("models: {teacher: a, student: b}\ndata: {train_path: x}\neval: {seeds: &s [1, *s]}\n")
    with pytest.raises(ConfigError, match=f"{p}: a YAML alias refers to a mapping or list that contains it"):
        load_config(p)
