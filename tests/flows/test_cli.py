"""The `pocl` command line: clear errors, the dry-run stage plan, and every shipped config validates."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from flows.cli import main
from pocl_core.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.models.trust_remote_code is False


def test_paper_plan_is_the_reference_schedule(capsys):
    assert main(["plan", "--config", "configs/paper.yaml", "--num-samples", "14000"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[2], r[3], r[5], r[6]) for r in rows] == [
        ("0", "3500", "8", "1.00", "0.70"), ("1", "7000", "8", "1.33", "0.80"),
        ("2", "10500", "8", "1.67", "0.90"), ("3", "14000", "8", "2.00", "1.00")]
    assert "20.1 passes over the data" in out  # 8 x (1+2+3+4)/4 = 20 passes, the baselines' budget


def test_plan_counts_the_data_file_and_the_baseline_has_one_stage(capsys):
    assert main(["plan", "--config", "configs/tiny.yaml", "curriculum.strategy=none"]) == 0
    out = capsys.readouterr().out
    assert "324 training samples" in out and "strategy none" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 1


def test_bad_override_is_a_clear_error_not_a_traceback(capsys):
    assert main(["run", "--config", "configs/tiny.yaml", "curriculum.num_stagez=3"]) == 2
    err = capsys.readouterr().err
    assert "curriculum.num_stagez: unknown key" in err and "Traceback" not in err
    assert main(["plan", "--config", "configs/absent.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_run_flags_become_the_flow_parameters(tmp_path, monkeypatch, listening_address):
    import flows.pipeline

    class Started(Exception):
        pass

    seen = {}

    def fake_flow(**params):
        seen.update(params)
        raise Started

    monkeypatch.setattr(flows.pipeline, "pocl_distill", fake_flow)
    models = []
    for name in ("teacher", "student"):  # folders that exist: the run's inputs are checked before the flow
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        models.append(f"models.{name}={tmp_path / name}")
    with pytest.raises(Started):
        main(["run", "--config", "configs/tiny.yaml", f"runs_root={tmp_path}", *models, "--run-name", "007",
              "--ray-address", listening_address])
    assert seen == {"config_path": "configs/tiny.yaml", "overrides": [f"runs_root={tmp_path}", *models],
                    "run_name": "007", "ray_address": listening_address, "resume": True}
    cfg = flows.pipeline.resolve_config(**seen)
    assert (cfg.run_name, cfg.ray.address) == ("007", listening_address)
    # {scheduled} is expanded once, before the pre-check, and the flow gets that very name
    before = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    with pytest.raises(Started):
        main(["run", "--config", "configs/tiny.yaml", f"runs_root={tmp_path}", *models, "--run-name", "n-{scheduled}"])
    after = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    assert seen["run_name"] in (f"n-{before}", f"n-{after}")


def test_overrides_may_stand_between_options_and_strays_are_named(capsys):
    from flows.cli import parse_args

    args = parse_args(["run", "--config", "c.yaml", "a.b=1", "--run-name", "x", "c.d=2", "--no-resume", "e=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e=3"] and args.run_name == "x" and args.resume is False
    with pytest.raises(SystemExit):
        parse_args(["plan", "--config", "c.yaml", "a=1", "--bogus", "b=2"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["build-tiny", "a=1"])
    assert "'build-tiny' takes no key=value overrides" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["compare", "--strategies", "antii"])
    assert "invalid choice: 'antii'" in capsys.readouterr().err


def test_a_double_dash_before_the_overrides_is_accepted():
    from flows.cli import parse_args

    assert parse_args(["run", "--config", "c.yaml", "--", "a.b=1", "c=2"]).overrides == ["a.b=1", "c=2"]
    assert parse_args(["run", "--", "a.b=1"]).overrides == ["a.b=1"]
    assert parse_args(["plan", "--config", "c.yaml", "--", "a=1"]).overrides == ["a=1"]
    args = parse_args(["compare", "--seeds", "1", "2", "--", "a=1"])
    assert args.seeds == [1, 2] and args.overrides == ["a=1"]


def test_every_option_has_help_and_the_overrides_may_go_anywhere(capsys):
    import argparse

    from flows.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    bare = [f"{name} {action.dest}" for name, command in commands.items() for action in command._actions
            if not action.help]
    assert bare == []
    assert "--config CONFIG YAML config every variant starts from (default: configs/quickstart.yaml)" in \
        " ".join(commands["compare"].format_help().split())
    assert "key=value overrides of the config (e.g. curriculum.num_stages=3) anywhere on the line" in \
        " ".join(parser.format_help().split())


def test_an_override_the_shell_split_at_its_spaces_is_named_with_quotes(capsys):
    from flows.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["plan", "--config", "c.yaml", "loss.params={alpha:", "2,", "beta:", "3}", "--num-samples", "9"])
    assert ("unrecognized arguments: 2, beta: 3} (the shell split an override at its spaces: quote it as one "
            "argument, 'loss.params={alpha: 2, beta: 3}')") in capsys.readouterr().err
    with pytest.raises(SystemExit):  # right after the sub-command argparse takes the pieces for overrides
        parse_args(["run", "loss.params={alpha:", "2}"])
    assert "unrecognized arguments: 2} (the shell split an override at its spaces: quote it as one argument, " \
           "'loss.params={alpha: 2}')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["plan", "--config", "c.yaml", "--num-samples", "9", "loss.params={alpha: 2}", "stray"])
    assert capsys.readouterr().err.endswith("unrecognized arguments: stray\n")  # a finished override: no hint
    assert parse_args(["run", "loss.params={alpha: 2}", "a.b=1"]).overrides == ["loss.params={alpha: 2}", "a.b=1"]
    for option in (["--seeds", "10", "20"], ["--losses", "fkl", "srkl"]):  # not taken as the list's values
        with pytest.raises(SystemExit):
            parse_args(["compare", *option, "loss.params={alpha:", "2}"])
        assert "the shell split an override at its spaces: quote it as one argument, 'loss.params={alpha: 2}'" \
            in capsys.readouterr().err
    args = parse_args(["compare", "--seeds", "10", "20", "loss.params={alpha: 2}", "--losses", "fkl"])
    assert (args.seeds, args.losses, args.overrides) == ([10, 20], ["fkl"], ["loss.params={alpha: 2}"])


def test_plan_refuses_no_samples_and_notes_stages_smaller_than_a_batch(capsys):
    assert main(["plan", "--config", "configs/tiny.yaml", "--num-samples", "0"]) == 2
    assert "--num-samples must be a positive number" in capsys.readouterr().err
    assert main(["plan", "--config", "configs/tiny.yaml", "--num-samples", "20", "curriculum.num_stages=4"]) == 0
    assert "note: stage(s) 0, 1, 2 hold fewer samples than the global batch (16)" in capsys.readouterr().out
    assert main(["plan", "--config", "configs/tiny.yaml", "--num-samples", "400"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_plan_notes_empty_buckets_and_a_warmup_longer_than_a_stage(capsys):
    assert main(["plan", "--config", "configs/tiny.yaml", "--num-samples", "3"]) == 0
    assert "note: 4 stages for 3 training samples: some buckets are empty" in capsys.readouterr().out
    assert main(["plan", "--config", "configs/tiny.yaml", "--num-samples", "300", "optim.warmup_steps=100"]) == 0
    out = capsys.readouterr().out
    assert "note: optim.warmup_steps (100) is not below the 5 optimizer steps an LR schedule spans" in out
    assert main(["plan", "--config", "configs/tiny.yaml", "--num-samples", "300", "optim.warmup_steps=20",
                 "curriculum.fresh_optimizer_per_stage=false"]) == 0
    assert "note: optim.warmup_steps" not in capsys.readouterr().out  # one schedule over all 49 steps


def test_plan_names_a_missing_tokenizer_folder_it_needs(tmp_path, capsys):
    args = ["plan", "--config", "configs/tiny.yaml", "data.long_prompts=drop"]
    assert main([*args, f"models.tokenizer={tmp_path / 'no-tok'}"]) == 2
    assert f"models.tokenizer: folder {tmp_path / 'no-tok'} not found" in capsys.readouterr().err
    assert main([*args, f"models.tokenizer={tmp_path}"]) == 2
    assert f"models.tokenizer: {tmp_path} holds no tokenizer files" in capsys.readouterr().err


@pytest.mark.parametrize("path, message", [
    ("", "the config path is empty"),
    ("/dev/null", "config /dev/null is not a regular file"),
    ("configs", "config configs is a folder"),
    ("no/such.yaml", "config file not found: no/such.yaml"),
])
def test_odd_config_paths_are_named(path, message, capsys):
    assert main(["plan", "--config", path, "--num-samples", "10"]) == 2
    assert message in capsys.readouterr().err


def test_compare_names_a_missing_model_folder_before_any_engine(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    args = ["compare", "--config", "configs/tiny.yaml", f"models.teacher={tmp_path}", "models.student=./no/such/student"]
    assert main(args) == 2
    assert "models.student: folder ./no/such/student not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--strategies", "curriculum", "anti", "a.b=1", "--losses", "fkl", "--seeds", "10", "20"],
    ["--strategies", "curriculum", "anti", "--losses", "fkl", "a.b=1", "--seeds", "10", "20"],
    ["--strategies", "curriculum", "anti", "--losses", "fkl", "--seeds", "10", "20", "a.b=1"],
], ids=["after-strategies", "after-losses", "after-seeds"])
def test_compare_overrides_after_a_list_option_are_overrides(argv):
    from flows.cli import parse_args

    args = parse_args(["compare", "--config", "c=1.yaml", *argv, "--name", "x", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"]
    assert args.strategies == ["curriculum", "anti"] and args.losses == ["fkl"] and args.seeds == [10, 20]
    assert args.config == "c=1.yaml" and args.name == "x"  # a one-value option's value stays its value


@pytest.mark.parametrize("extra, message", [
    (["curriculum.strategy=anti"], "override 'curriculum.strategy=anti': each variant sets curriculum.strategy itself; "
                                   "use --strategies"),
    (["run_name=mine"], "each variant sets run_name itself; use --name"),
    (["curriculum.shuffle_seed=5"], "use --seeds"),
    (["curriculum={strategy: anti, num_stages: 3}"], "each variant sets curriculum.strategy itself; use --strategies"),
    (["--seeds", "10", "20", "seed=5"], "override 'seed=5': each variant sets seed itself; use --seeds"),
    (["--seeds", "10", "10"], "--seeds lists 10 more than once"),
    (["--seeds", "-1"], "--seeds -1: a seed is a whole number from 0 to 2^63 - 1"),
    (["--losses", "kl", "models.teacher=/no/such/teacher"], "--losses kl: unknown KD loss; valid names: fkl"),
    (["--strategies", "none", "curriculum", "none"], "--strategies lists none more than once"),
    (["--name", "../elsewhere"], "comparison name '../elsewhere': one folder name under runs_root"),
    (["--name", ""], "comparison name '': one folder name"),
    (["--name", "compare\n"], "comparison name 'compare\\n': one folder name"),  # `$` matches before a final newline
    (["--name", "c" * 129], "at most 128 characters"),
])
def test_compare_refuses_what_its_variants_would_ignore_or_misplace(extra, message, capsys):
    assert main(["compare", "--config", "configs/tiny.yaml", *extra]) == 2
    assert message in capsys.readouterr().err


def test_plan_applies_the_training_cap_to_num_samples(capsys):
    assert main(["plan", "--config", "configs/tiny.yaml", "--num-samples", "100", "data.max_train_samples=10"]) == 0
    out = capsys.readouterr().out
    assert "10 training samples (--num-samples 100, capped by data.max_train_samples=10)" in out
    assert main(["plan", "--config", "configs/tiny.yaml", "--num-samples", "8", "data.max_train_samples=10"]) == 0
    assert "8 training samples (--num-samples 8)" in capsys.readouterr().out


def test_plan_says_how_many_bad_rows_it_dropped(tmp_path, capsys):
    rows = [f'{{"prompt": "q{i}", "response": "a{i}"}}' for i in range(10)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:4] + ['{"prompt": "no response"}', "not json"] + rows[4:]) + "\n")
    args = ["plan", "--config", "configs/tiny.yaml", f"data.train_path={tmp_path / 'train.jsonl'}"]
    assert main([*args, "data.on_bad_rows=error"]) == 2
    assert main([*args, "data.on_bad_rows=drop"]) == 2  # as the run: 10% of these 10 samples hold out none
    assert "no held-out samples left (10 samples read, 0 of them in the held-out split" in capsys.readouterr().err
    assert main([*args, "data.on_bad_rows=drop", "data.eval_fraction=0.3"]) == 0
    assert f"8 training samples ({tmp_path / 'train.jsonl'}, 2 bad row(s) dropped by data.on_bad_rows=drop)" \
        in capsys.readouterr().out


def test_plan_refuses_what_the_run_refuses_and_reads_the_eval_file(tmp_path, capsys):
    assert main(["plan", "--config", "configs/tiny.yaml", "data.eval_fraction=0.9999"]) == 2
    assert ("data/tiny/instructions.jsonl: no training samples left (360 samples read, 0 of them in the training "
            "split (data.eval_fraction=0.9999)); lower data.eval_fraction") in capsys.readouterr().err
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "no response"}\n')
    args = ["plan", "--config", "configs/tiny.yaml", f"data.eval_path={eval_file}"]
    assert main(args) == 2
    assert f"{eval_file}:2: missing field 'response'" in capsys.readouterr().err
    assert main([*args, "data.on_bad_rows=drop"]) == 0  # the whole training file trains: the eval file holds out
    assert ("360 training samples (data/tiny/instructions.jsonl, 1 bad row(s) dropped by data.on_bad_rows=drop)"
            in capsys.readouterr().out)
    first = Path("data/tiny/instructions.jsonl").read_text().splitlines()[0]
    eval_file.write_text(first + "\n")
    assert main(args) == 2
    assert f"{eval_file}: 1 of its 1 held-out samples are also in data/tiny/instructions.jsonl" in \
        capsys.readouterr().err


def test_plan_counts_the_samples_long_prompts_drop_removes(tiny_models, capsys):
    from transformers import AutoTokenizer

    from pocl_core.data import drop_long_prompts, load_samples, split_holdout

    train = split_holdout(load_samples("data/tiny/instructions.jsonl")[0], 0.1)[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.student)
    cfg = load_config("configs/tiny.yaml")
    kept, dropped = drop_long_prompts(train, tokenizer, cfg.data.prompt_template, 20)
    assert 0 < dropped < len(train)
    args = ["plan", "--config", "configs/tiny.yaml", f"models.student={tiny_models.student}",
            "data.max_prompt_length=20"]
    assert main(args) == 0
    assert f"{len(train)} training samples (data/tiny/instructions.jsonl)" in capsys.readouterr().out
    assert main([*args, "data.long_prompts=drop"]) == 0
    assert (f"{len(kept)} training samples (data/tiny/instructions.jsonl, {dropped} sample(s) with a long prompt "
            "dropped by data.long_prompts=drop)") in capsys.readouterr().out


def test_plan_names_a_missing_data_file_and_the_way_around_it(capsys):
    assert main(["plan", "--config", "configs/paper.yaml"]) == 2
    err = capsys.readouterr().err
    assert "data.train_path: data/dolly/train.jsonl not found" in err and "or pass --num-samples N" in err
    assert main(["plan", "--config", "configs/tiny.yaml", "data.eval_path=data/tiny/missing.jsonl"]) == 2
    assert "data.eval_path: data/tiny/missing.jsonl not found" in capsys.readouterr().err


def test_a_relative_model_path_not_found_says_where_relative_paths_start(tmp_path, monkeypatch, capsys):
    config = Path("configs/tiny.yaml").resolve()
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--config", str(config), f"runs_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert (f"models.teacher: folder .cache/tiny/teacher not found (looked for {tmp_path}/.cache/tiny/teacher: "
            f"relative paths start at the current directory {tmp_path}, not at the config file") in err


def test_a_run_name_that_is_not_a_folder_name_says_so(capsys):
    assert main(["plan", "--config", "configs/tiny.yaml", "--num-samples", "10", "run_name=a/b"]) == 2
    assert ("run_name: 'a/b' is not a folder name: use letters, digits, '.', '_' and '-', starting with a letter "
            "or digit") in capsys.readouterr().err
    assert main(["plan", "--config", "configs/tiny.yaml", "--num-samples", "10", "seed=5"]) == 0
    assert "loss fkl, global batch 16" in capsys.readouterr().out  # no stray space without loss params


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"prompt": "say {i}", "response": "{i} {i}"}}\n' for i in range(20)))
    return data


def test_build_tiny_refuses_a_file_as_out(tmp_path, tiny_data, capsys):
    taken = tmp_path / "file"
    taken.write_text("")
    for out in (taken, taken / "sub"):
        assert main(["build-tiny", "--out", str(out), "--data", str(tiny_data)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: {taken} is a file, not a folder; choose another output folder" in err
        assert "Traceback" not in err


def test_build_tiny_refuses_negative_warmup_steps(tmp_path, tiny_data, capsys):
    out = tmp_path / "tiny"
    assert main(["build-tiny", "--out", str(out), "--data", str(tiny_data), "--warmup-steps", "-1"]) == 2
    assert "--warmup-steps must be 0 or more teacher pre-training steps, got -1" in capsys.readouterr().err
    assert not out.exists()


def test_an_interrupted_build_tiny_is_not_taken_for_a_finished_one(tmp_path, tiny_data, monkeypatch, capsys):
    from transformers import PreTrainedModel

    data = tiny_data
    out, args = tmp_path / "tiny", ["--data", str(data), "--warmup-steps", "0"]
    save = PreTrainedModel.save_pretrained
    saved = []

    def cut_short(self, folder, **kwargs):  # the second model: its config.json is written, then the disk fills
        saved.append(folder)
        if len(saved) == 1:
            return save(self, folder, **kwargs)
        self.config.save_pretrained(folder)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", cut_short)
    with pytest.raises(OSError, match="No space left"):
        main(["build-tiny", "--out", str(out), *args])
    assert sorted(p.name for p in out.iterdir()) == ["teacher"]  # no student folder, no temporary folder
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)
    assert main(["build-tiny", "--out", str(out), *args]) == 0  # builds the student only
    assert capsys.readouterr().out == f"teacher: {out / 'teacher'}\nstudent: {out / 'student'}\n"
    assert main(["build-tiny", "--out", str(out), *args]) == 0
    assert capsys.readouterr().out == f"tiny models already in {out} (use --force to rebuild)\n"
    assert main(["build-tiny", "--out", str(out), "--data", str(data), "--warmup-steps", "3"]) == 2
    assert "teacher was built from other inputs (warmup_steps: 0 != 3)" in capsys.readouterr().err

    # a folder with a config.json and no build record (an earlier version's build, perhaps cut short) is not built
    (out / "student" / "pocl_prep.json").unlink()
    (out / "student" / "model.safetensors").unlink()
    assert main(["build-tiny", "--out", str(out), *args]) == 2
    assert f"{out / 'student'} exists but is not a model folder" in capsys.readouterr().err
    assert main(["build-tiny", "--out", str(out), *args, "--force"]) == 0
    assert (out / "student" / "model.safetensors").is_file() and (out / "student" / "pocl_prep.json").is_file()

    # a complete build of an earlier version (its tiny.json written last, no build records) is rebuilt
    weights = (out / "teacher" / "model.safetensors").read_bytes()
    for name in ("teacher", "student"):
        (out / name / "pocl_prep.json").unlink()
    (out / "tiny.json").write_text("{}")
    capsys.readouterr()
    assert main(["build-tiny", "--out", str(out), *args]) == 0
    assert "predate build records" in capsys.readouterr().out and not (out / "tiny.json").exists()
    assert (out / "teacher" / "pocl_prep.json").is_file() and (out / "teacher" / "model.safetensors").read_bytes() == weights


def test_the_command_recorded_in_comparison_md_runs_the_same_comparison_from_a_shell():
    import shlex

    from flows.cli import parse_args
    from flows.compare import compare_command

    overrides = ["loss.name=srkl", "loss.params={alpha: 0.1}", "runs_root=/tmp/my runs"]
    command = compare_command("configs/tiny.yaml", overrides, ["curriculum", "none"], ["srkl"], [10, 20], "cmp")
    argv = shlex.split(command)
    assert argv[0] == "pocl"
    args = parse_args(argv[1:])
    assert (args.config, args.overrides, args.strategies, args.losses, args.seeds, args.name) == (
        "configs/tiny.yaml", overrides, ["curriculum", "none"], ["srkl"], [10, 20], "cmp")
