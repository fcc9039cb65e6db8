"""The flow's UI parameters: ray_address and resume, and parameter errors as one clear message.

These call the resolver or ``pocl_distill.fn`` with inputs that fail before any model, Ray or Prefect
server is needed.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from flows.pipeline import parameter_errors_logged, pocl_distill, resolve_config
from pocl_core.config import ConfigError
from pocl_core.data import DataError

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture
def models(tmp_path) -> list[str]:
    """Overrides pointing the tiny config at model folders that exist (nothing is loaded from them)."""
    for name in ("teacher", "student"):  # a config.json makes them model folders to the pre-start check
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
    return [f"models.teacher={tmp_path / 'models' / 'teacher'}", f"models.student={tmp_path / 'models' / 'student'}"]


def test_ray_address_and_run_name_become_overrides_and_stay_strings(tmp_path, models, listening_address):
    cfg = resolve_config(TINY, [f"runs_root={tmp_path}", "ray.address=ignored:1", *models], "007", listening_address)
    assert cfg.ray.address == listening_address and cfg.run_name == "007"
    assert resolve_config(TINY, [f"runs_root={tmp_path}", *models], None, None).ray.address is None


def test_resume_false_refuses_an_existing_run_folder(tmp_path, models):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError) as err:
        resolve_config(TINY, [f"runs_root={tmp_path}", *models], "taken", resume=False)
    msg = str(err.value)
    assert str(tmp_path / "taken") in msg and "new run_name" in msg
    assert resolve_config(TINY, [f"runs_root={tmp_path}", *models], "taken", resume=True).run_name == "taken"
    assert resolve_config(TINY, [f"runs_root={tmp_path}", *models], "fresh", resume=False).run_name == "fresh"


def test_model_folders_without_a_model_or_tokenizer_are_named_before_any_engine(tmp_path, models):
    empty = tmp_path / "empty"
    empty.mkdir()
    for key in ("teacher", "student"):
        with pytest.raises(ConfigError, match=f"models.{key}: {empty} holds no config.json, so it is no Hugging Face "
                                              "model folder"):
            resolve_config(TINY, [f"runs_root={tmp_path}", *models, f"models.{key}={empty}"], None)
    with pytest.raises(ConfigError, match=f"models.tokenizer: {empty} holds no tokenizer files"):
        resolve_config(TINY, [f"runs_root={tmp_path}", *models, f"models.tokenizer={empty}"], None)
    (empty / "tokenizer.json").write_text("{}")
    assert resolve_config(TINY, [f"runs_root={tmp_path}", *models, f"models.tokenizer={empty}"], None)


def test_a_chat_prompt_template_without_a_chat_template_is_named_before_any_engine(tmp_path, models):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    args = [f"runs_root={tmp_path}", *models, f"models.tokenizer={tok}", "data.prompt_template=chat"]
    with pytest.raises(ConfigError, match=f"data.prompt_template is 'chat' but the tokenizer in {tok} "
                                          r"\(models.tokenizer\) has no chat template"):
        resolve_config(TINY, args, None)
    (tok / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    assert resolve_config(TINY, args, None)
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "chat_template.jinja").write_text("{{ messages }}")
    assert resolve_config(TINY, args, None)
    # a student folder without any tokenizer (the tokenizer source when models.tokenizer is unset): no
    # advice about templates; the tokenizer's loader names the folder later
    assert resolve_config(TINY, [f"runs_root={tmp_path}", *models, "data.prompt_template=chat"], None)


def test_sequences_longer_than_a_models_positions_are_named_before_any_engine(tmp_path, models):
    short = tmp_path / "short"
    short.mkdir()
    (short / "config.json").write_text('{"max_position_embeddings": 80}')
    base = [f"runs_root={tmp_path}", *models, f"models.teacher={short}"]
    with pytest.raises(ConfigError, match=rf"data.max_length = 96 tokens, more than the 80 positions models.teacher "
                                          rf"{short} was built for"):
        resolve_config(TINY, base, None)
    with pytest.raises(ConfigError, match=r"data.max_prompt_length \+ eval.max_new_tokens = 84 tokens, more than the 80"):
        resolve_config(TINY, [*base, "data.max_length=80", "eval.max_new_tokens=20"], None)
    with pytest.raises(ConfigError, match=r"data.max_prompt_length \+ scoring.generation.max_new_tokens = 90 tokens"):
        resolve_config(TINY, [*base, "data.max_length=80", "scoring.measures=[nll, rouge_l]",
                              "scoring.generation.max_new_tokens=26"], None)
    assert resolve_config(TINY, [*base, "data.max_length=80", "scoring.measures=[nll]",
                                 "scoring.generation.max_new_tokens=26"], None)  # no generation in scoring
    (short / "config.json").write_text('{"text_config": {"n_positions": 64}}')
    with pytest.raises(ConfigError, match="more than the 64 positions"):
        resolve_config(TINY, base, None)
    # no hard limit: stretched rotary positions, ALiBi; the largest of the keys counts
    for config in ('{"max_position_embeddings": 80, "rope_scaling": {"type": "linear", "factor": 4.0}}',
                   '{"max_position_embeddings": 80, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}',
                   '{"model_type": "bloom", "seq_length": 80}', '{"alibi": true, "max_position_embeddings": 80}',
                   '{"max_position_embeddings": 80, "max_sequence_length": 4096}'):
        (short / "config.json").write_text(config)
        assert resolve_config(TINY, base, None)
    (short / "config.json").write_text('{"max_position_embeddings": 80, "rope_parameters": {"rope_type": "default"}}')
    with pytest.raises(ConfigError, match="more than the 80 positions"):
        resolve_config(TINY, base, None)
    # scoring's generation runs on the scoring model only (the teacher by default), not on the student
    (short / "config.json").write_text('{"max_position_embeddings": 96}')
    assert resolve_config(TINY, [f"runs_root={tmp_path}", *models, f"models.student={short}",
                                 "scoring.measures=[nll, rouge_l]", "scoring.generation.max_new_tokens=64"], None)


@pytest.mark.parametrize("override, message", [
    ("models.teacher=.cache/nowhere/teachr", "models.teacher: folder .cache/nowhere/teachr not found"),
    ("models.student=/no/such/student", "models.student: folder /no/such/student not found"),
    ("models.tokenizer=./tok", "models.tokenizer: folder ./tok not found"),
    ("data.train_path=no-such.jsonl", "data.train_path: "),
    ("data.eval_path=/no/eval.jsonl", "data.eval_path: /no/eval.jsonl not found"),
    ("data.train_path=s3://bucket/train.jsonl",
     "data.train_path: s3://bucket/train.jsonl is a URI, but data.train_path must be a local file path"),
    ("data.eval_path=file:///srv/eval.jsonl",
     "data.eval_path: file:///srv/eval.jsonl is a URI, but data.eval_path must be a local file path"),
])
def test_missing_model_folders_and_data_files_are_named_before_any_engine(tmp_path, models, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config(TINY, [f"runs_root={tmp_path}", *models, override], None)
    assert not (tmp_path / "tiny").exists()
    # a hub id (org/name) is not a local path: it passes and is left to Hugging Face
    hub = resolve_config(TINY, [f"runs_root={tmp_path}", *models, "models.teacher=HuggingFaceTB/SmolLM2-135M"], None)
    assert hub.models.teacher == "HuggingFaceTB/SmolLM2-135M"


def test_resume_false_in_the_flow_is_one_logged_message(tmp_path, caplog):
    (tmp_path / "taken").mkdir()
    with caplog.at_level(logging.ERROR), pytest.raises(ConfigError) as err:
        pocl_distill.fn(config_path=TINY, overrides=[f"runs_root={tmp_path}"], run_name="taken", resume=False)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [str(err.value)]
    assert not (tmp_path / "taken" / "config.yaml").exists()


def test_bad_override_in_the_flow_is_a_short_config_error(caplog):
    with caplog.at_level(logging.ERROR), pytest.raises(ConfigError) as err:
        pocl_distill.fn(config_path=TINY, overrides=["curriculum.num_stagez=3"])
    assert "curriculum.num_stagez: unknown key" in str(err.value)
    assert isinstance(err.value, ValueError) and err.value.__cause__ is None
    assert any("num_stagez" in r.getMessage() for r in caplog.records)


def test_data_errors_are_logged_once_and_keep_their_type(caplog):
    # Calling a task outside a flow run would start Prefect's temporary server, so the data error
    # is raised directly inside the helper that wraps the flow body.
    def bad_data() -> None:
        raise DataError("data/x.jsonl row 3: missing field 'response'")

    with caplog.at_level(logging.ERROR), pytest.raises(DataError) as err:
        with parameter_errors_logged():
            bad_data()
    assert str(err.value) == "data/x.jsonl row 3: missing field 'response'"
    assert err.value.__suppress_context__ and err.value.__cause__ is None
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [str(err.value)]


def test_other_errors_pass_through_unchanged():
    boom = RuntimeError("worker died")
    with pytest.raises(RuntimeError) as err:
        with parameter_errors_logged():
            raise boom
    assert err.value is boom


def test_changed_settings_name_the_dotted_keys_that_differ_from_config_yaml(tmp_path, models):
    from flows.pipeline import changed_settings
    from pocl_core.contracts import RunPaths

    ran = resolve_config(TINY, [f"runs_root={tmp_path}", *models], "r")
    paths = RunPaths.of(ran.run_dir)
    assert changed_settings(paths, ran) == []  # no config.yaml yet
    paths.root.mkdir(parents=True)
    paths.config.write_text(ran.to_yaml())
    now = resolve_config(TINY, [f"runs_root={tmp_path}", *models, "optim.lr=0.5", "eval.seeds=[1, 2]",
                                "models.tokenizer=HuggingFaceTB/x"], "r")
    assert changed_settings(paths, now) == ["models.tokenizer: None → 'HuggingFaceTB/x'",
                                            f"optim.lr: {ran.optim.lr!r} → 0.5",
                                            f"eval.seeds: {ran.eval.seeds!r} → [1, 2]"]


def test_resume_false_accepts_the_folder_its_own_flow_run_created(tmp_path, models, monkeypatch):
    from flows.pipeline import record_flow_run
    from pocl_core.contracts import RunPaths

    args = (TINY, [f"runs_root={tmp_path}", *models], "retried")
    paths = RunPaths.of(resolve_config(*args, resume=False).run_dir)
    record_flow_run(paths)  # outside a flow run (a .fn call): nothing is recorded, no folder made
    assert not paths.root.exists()
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "run-a")  # prefect.runtime's documented mock
    record_flow_run(paths)
    assert paths.flow_run_id.read_text() == "run-a\n"
    # a Retry re-runs the same flow run with the same parameters: its own folder is accepted
    assert resolve_config(*args, resume=False).run_name == "retried"
    # another flow run, or a call outside any, is refused as before
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "run-b")
    with pytest.raises(ConfigError, match="already exists and resume is false"):
        resolve_config(*args, resume=False)
    record_flow_run(paths)  # an existing folder keeps the flow run that created it
    assert paths.flow_run_id.read_text() == "run-a\n"
    monkeypatch.delenv("PREFECT__RUNTIME__FLOW_RUN__ID")
    with pytest.raises(ConfigError, match="already exists and resume is false"):
        resolve_config(*args, resume=False)


def test_resume_false_folder_without_a_recorded_flow_run_is_refused_inside_a_flow_run(tmp_path, models,
                                                                                       monkeypatch):
    (tmp_path / "taken").mkdir()  # made by an earlier version, or by hand
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "run-a")
    with pytest.raises(ConfigError, match="already exists and resume is false"):
        resolve_config(TINY, [f"runs_root={tmp_path}", *models], "taken", resume=False)


@pytest.mark.slow
def test_retry_of_a_resume_false_flow_run_reuses_its_run_folder(prefect_harness, tmp_path, models):
    from prefect import get_client
    from prefect.flow_engine import run_flow_sync
    from prefect.states import AwaitingRetry

    from pocl_core.contracts import RunPaths

    # the model folders are empty: the data load succeeds, then scoring fails loading the teacher
    params = dict(config_path=TINY, overrides=[f"runs_root={tmp_path}", *models], run_name="retried", resume=False)
    first = pocl_distill(**params, return_state=True)
    assert first.is_failed() and "no tokenizer files to fingerprint" in str(first.data)
    flow_run_id = str(first.state_details.flow_run_id)
    paths = RunPaths.of(tmp_path / "retried")
    assert paths.flow_run_id.read_text() == f"{flow_run_id}\n"

    # the UI's Retry: the same flow run, forced to AwaitingRetry, runs the flow again with its parameters
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, AwaitingRetry(message="Retry from the UI"), force=True)
        flow_run = client.read_flow_run(flow_run_id)
    retried = run_flow_sync(pocl_distill, flow_run=flow_run, parameters=params, return_type="state")
    assert retried.is_failed() and "no tokenizer files to fingerprint" in str(retried.data)  # past the folder check

    other = pocl_distill(**params, return_state=True)  # a new flow run with the same run_name is refused
    assert other.is_failed() and "already exists and resume is false" in str(other.data)


def test_a_run_that_fails_loading_its_data_leaves_no_folder_behind(tmp_path, models, monkeypatch):
    """The flow records its flow run id before loading; a load that fails removes the folder it made,
    so a new flow run with the same name and resume=false is not refused."""
    def failing_load(cfg):
        (tmp_path / "fresh" / "data").mkdir(parents=True)  # whatever the load had written goes too
        raise DataError("data/x.jsonl row 3: missing field 'response'")

    monkeypatch.setattr("flows.pipeline.load_dataset", failing_load)
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "run-a")
    args = dict(config_path=TINY, overrides=[f"runs_root={tmp_path}", *models], run_name="fresh", resume=False)
    with pytest.raises(DataError, match="row 3"):
        pocl_distill.fn(**args)
    assert not (tmp_path / "fresh").exists()
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "run-b")
    assert resolve_config(TINY, args["overrides"], "fresh", resume=False).run_name == "fresh"
    # a folder the flow run did not create (a resumed run) is left as it is
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text("kept\n")
    with pytest.raises(DataError, match="row 3"):
        pocl_distill.fn(**{**args, "resume": True})
    assert (tmp_path / "fresh" / "config.yaml").read_text() == "kept\n"


def test_a_failing_clean_up_does_not_hide_the_data_error(tmp_path, models, monkeypatch, caplog):
    """An object store that refuses the delete: the data error is raised, the clean-up's is a warning."""
    def failing_load(cfg):
        raise DataError("data/x.jsonl row 3: missing field 'response'")

    def refuse(path):
        raise PermissionError(13, "AccessDenied: s3:DeleteObject")

    monkeypatch.setattr("flows.pipeline.load_dataset", failing_load)
    monkeypatch.setattr("flows.pipeline.remove_tree", refuse)
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "run-a")
    with caplog.at_level(logging.WARNING, logger="pocl"), pytest.raises(DataError, match="row 3"):
        pocl_distill.fn(config_path=TINY, overrides=[f"runs_root={tmp_path}", *models], run_name="fresh", resume=False)
    assert "could not remove the new folder" in caplog.text and "AccessDenied" in caplog.text


def test_a_ray_address_nothing_answers_on_is_refused_before_any_work(tmp_path, models, listening_address, monkeypatch):
    """ray.init would retry it for minutes, after scoring."""
    import socket

    import tasks.distill

    monkeypatch.setattr(tasks.distill.ray, "is_initialized", lambda: False)  # not a Ray of an earlier test
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(ConfigError, match=rf"ray.address {dead}: nothing answers at {dead} \(.*\); start the cluster"):
        resolve_config(TINY, [f"runs_root={tmp_path}", *models], None, dead)
    monkeypatch.setenv("RAY_ADDRESS", f"ray://{dead}")
    with pytest.raises(ConfigError, match=rf"RAY_ADDRESS ray://{dead}: nothing answers"):
        resolve_config(TINY, [f"runs_root={tmp_path}", *models], None, None)
    assert resolve_config(TINY, [f"runs_root={tmp_path}", *models], None, "auto").ray.address == "auto"
    assert resolve_config(TINY, [f"runs_root={tmp_path}", *models], None, f"ray://{listening_address}")
    monkeypatch.delenv("RAY_ADDRESS")
    (tmp_path / "a-file").write_text("")
    for root in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        with pytest.raises(ConfigError, match=f"runs_root {root}: {tmp_path / 'a-file'} is a file, not a folder"):
            resolve_config(TINY, [f"runs_root={root}", *models], None, None)
    for malformed in ("foo", "10.0.0.5", "127.0.0.1:abc"):  # ray.init: "Invalid address format", after scoring
        with pytest.raises(ConfigError, match=rf"ray.address '{malformed}': not a Ray address; give host:port"):
            resolve_config(TINY, [f"runs_root={tmp_path}", *models], None, malformed)
    assert not list(tmp_path.glob("tiny*"))  # no run folder


def test_library_warnings_reach_the_flow_runs_logs(prefect_harness):
    """The `pocl` logger's records (a dropped row, a skipped checkpoint, a taken-over lock) show in the
    flow run's logs in the UI inside the flows, and only there."""
    import logging
    import uuid

    from prefect import flow, get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import library_logs_in_run

    mark = uuid.uuid4().hex

    @flow
    def warns() -> str:
        with library_logs_in_run():
            logging.getLogger("pocl").warning("inside %s", mark)
        logging.getLogger("pocl").warning("outside %s", mark)
        from prefect.runtime import flow_run
        return flow_run.id

    flow_run_id = warns()
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))
    messages = [log.message for log in logs]
    assert f"inside {mark}" in messages and f"outside {mark}" not in messages
    assert not [h for h in logging.getLogger("pocl").handlers if isinstance(h, APILogHandler)]
    with library_logs_in_run():  # outside a flow run it adds nothing (no warnings about a missing run)
        assert not logging.getLogger("pocl").handlers
