"""Data sources and policies: HF dataset folders, Parquet bad rows, the chat template, long prompts, config."""

import json
import logging
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pocl_core.config import ConfigError, DataConfig, load_config
from pocl_core.data import DataError, Sample, drop_long_prompts, load_samples
from pocl_core.encoding import encode_prompt, encode_sample
from pocl_core.tiny import train_tokenizer

CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
GOOD = {"instruction": "Define the word 'cat'.", "context": "", "response": "A small feline.", "id": "a"}


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = train_tokenizer(["define the word cat", "a small feline", "user assistant"] * 4, vocab_size=300)
    tok.chat_template = CHAT
    return tok


# --- Hugging Face dataset folders -------------------------------------------------------------


def test_hf_dataset_folder_loads_and_reports_bad_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    good = tmp_path / "good"
    datasets.Dataset.from_list([GOOD, {**GOOD, "id": "b", "instruction": "Define 'dog'."}]).save_to_disk(str(good))
    samples, dropped = load_samples(good)
    assert [s.sample_id for s in samples] == ["a", "b"] and dropped == 0
    assert samples[0] == Sample("a", "Define the word 'cat'.", "A small feline.")

    bad = tmp_path / "bad"
    datasets.Dataset.from_list([GOOD, {**GOOD, "id": "b", "response": " "}, {**GOOD, "id": "a"}]).save_to_disk(str(bad))
    with pytest.raises(DataError, match=r"bad: row 1: empty response"):
        load_samples(bad)
    samples, dropped = load_samples(bad, on_bad_rows="drop")
    assert [s.sample_id for s in samples] == ["a"] and dropped == 2


def test_hf_dataset_dict_and_foreign_folders_are_explained(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([GOOD])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: a DatasetDict with splits \['train', 'test'\]; point the path at"):
        load_samples(tmp_path / "dd")
    assert load_samples(tmp_path / "dd" / "train")[0][0].sample_id == "a"
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="a folder but not a Hugging Face dataset folder"):
        load_samples(tmp_path / "plain")


# --- Parquet ----------------------------------------------------------------------------------


@pytest.mark.parametrize("column, values, message", [
    ("response", ["ok", None], "null field 'response'"),
    ("response", ["ok", ""], "empty response"),
    ("response", [b"ok", b"\xff\xfe"], "field 'response' is not valid UTF-8"),
    ("id", ["x", "x"], r"duplicate sample id 'x' \(first at .*p.parquet: row 0\)"),
])
def test_parquet_bad_rows_name_file_and_row(tmp_path, column, values, message):
    cols = {"instruction": ["q1", "q2"], "response": ["r1", "r2"], "id": ["x", "y"], column: values}
    pq.write_table(pa.table(cols), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=rf"p.parquet: row 1: {message}"):
        load_samples(tmp_path / "p.parquet")
    samples, dropped = load_samples(tmp_path / "p.parquet", on_bad_rows="drop")
    assert [s.sample_id for s in samples] == ["x"] and dropped == 1


def test_parquet_non_string_column_and_corrupt_file(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints.parquet: row 0: field 'response' must be a string, got int"):
        load_samples(tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"no usable samples \(2 bad rows dropped; the first: .*ints.parquet: row 0: "
                                         r"field 'response' must be a string, got int\)"):
        load_samples(tmp_path / "ints.parquet", on_bad_rows="drop")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: cannot read the Parquet file"):
        load_samples(tmp_path / "junk.parquet")


def test_unknown_policy_and_file_type(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported data file type '.csv'"):
        load_samples(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="on_bad_rows must be 'error' or 'drop'"):
        load_samples(tmp_path / "d.csv", on_bad_rows="skip")


# --- chat template and long prompts ------------------------------------------------------------


def test_chat_template_wraps_one_user_turn(chat_tokenizer):
    tok = chat_tokenizer
    ids = encode_prompt(tok, "define the word cat", "chat", 256)
    text = "<s>user\ndefine the word cat</s>\n<s>assistant\n"
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # no extra BOS: the template holds its own special tokens
    e = encode_sample(tok, Sample("s", "define the word cat", "a small feline"), "chat", 256, 512)
    assert e.input_ids[:e.n_prompt] == ids and e.input_ids[-1] == tok.eos_token_id
    assert tok.decode(e.input_ids[e.n_prompt:], skip_special_tokens=True) == "a small feline"
    # Truncation keeps the end of the prompt (the assistant header), as with format-string templates.
    assert encode_prompt(tok, "define the word cat", "chat", 5) == ids[-5:]
    assert encode_prompt(tok, "cat", "Q: {prompt}\nA:", 256) == tok("Q: cat\nA:")["input_ids"]


def test_chat_template_needs_a_tokenizer_template():
    tok = train_tokenizer(["plain text only"] * 4, vocab_size=280)
    with pytest.raises(DataError, match="prompt_template is 'chat' but the tokenizer .* has no chat_template"):
        encode_prompt(tok, "x", "chat", 16)


def test_drop_long_prompts_counts_and_keeps_order(chat_tokenizer):
    samples = [Sample(str(i), "cat " * n, "r") for i, n in enumerate([1, 40, 2, 60])]
    limit = len(encode_prompt(chat_tokenizer, "cat " * 2, "chat", 10_000))
    kept, dropped = drop_long_prompts(samples, chat_tokenizer, "chat", limit)
    assert [s.sample_id for s in kept] == ["0", "2"] and dropped == 2
    assert drop_long_prompts(samples, chat_tokenizer, "chat", 10_000) == (samples, 0)


# --- config and the load-dataset task ------------------------------------------------------------


def test_data_config_template_and_policies():
    cfg = DataConfig(train_path="x.jsonl", prompt_template="chat")
    assert (cfg.on_bad_rows, cfg.long_prompts) == ("error", "truncate")
    with pytest.raises(ValueError, match="must contain '\\{prompt\\}' or be 'chat'"):
        DataConfig(train_path="x.jsonl", prompt_template="Question:")
    for template, error in (('Reply as JSON {"answer": ...}\n{prompt}', "KeyError: '\"answer\"'"),
                            ("{prompt} }", "ValueError: Single '}' encountered"), ("{0}: {prompt}", "IndexError")):
        with pytest.raises(ValueError, match=r"only field is \{prompt\}, and formatting it fails \(" + re.escape(error)):
            DataConfig(train_path="x.jsonl", prompt_template=template)
    assert DataConfig(train_path="x.jsonl", prompt_template='JSON {{"a": 1}}: {prompt}').prompt_template.format(
        prompt="p") == 'JSON {"a": 1}: p'
    base = {"models": {"teacher": "t", "student": "s"}, "data": {"train_path": "x.jsonl"}}
    for key in ("on_bad_rows", "long_prompts"):
        with pytest.raises(ConfigError, match=rf"data\.{key}: Input should be"):
            load_config(base=base, overrides=[f"data.{key}=sometimes"])


@pytest.fixture
def run_config(tmp_path, chat_tokenizer):
    tok_dir = tmp_path / "tok"
    chat_tokenizer.save_pretrained(tok_dir)
    rows = [{**GOOD, "id": f"r{i}", "instruction": "cat " * (1 + (i % 5) * 20)} for i in range(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"instruction": "no response"}\n')

    def make(*overrides: str):
        base = {"models": {"teacher": str(tok_dir), "student": str(tok_dir)},
                "data": {"train_path": str(data), "prompt_template": "chat", "eval_fraction": 0.3,
                         "max_prompt_length": 40, "max_length": 64},
                "runs_root": str(tmp_path / "runs"), "ray": {"num_workers": 1}}
        return load_config(base=base, overrides=list(overrides))

    return make


def test_load_dataset_task_applies_bad_row_and_long_prompt_policies(run_config):
    pytest.importorskip("prefect")
    from pocl_core.data import table_to_samples
    from tasks.load_data import load_dataset

    with pytest.raises(DataError, match=r"d.jsonl:41: missing field 'response'"):
        load_dataset.fn(run_config())
    splits = load_dataset.fn(run_config("run_name=keep", "data.on_bad_rows=drop"))
    assert splits.num_train + splits.num_eval == 40
    logged: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("pocl")  # task_logger() outside a Prefect run
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        splits = load_dataset.fn(run_config("run_name=short", "data.on_bad_rows=drop", "data.long_prompts=drop"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert splits.num_train + splits.num_eval == 16  # only the 1- and 21-word prompts fit in 40 tokens
    kept = table_to_samples(pq.read_table(splits.train_path)) + table_to_samples(pq.read_table(splits.eval_path))
    assert all(s.prompt.count("cat") in (1, 21) for s in kept)
    assert "dropped 18 train / 6 held-out samples whose prompt exceeds data.max_prompt_length=40 tokens" in logged


def test_load_dataset_reuses_unchanged_inputs_and_refuses_changed_ones(run_config, tmp_path, chat_tokenizer):
    """An unchanged rerun reuses the splits; an edited data file, or (when long prompts are dropped)
    another tokenizer, under the same run folder is refused as stale, naming what changed."""
    pytest.importorskip("prefect")
    from pocl_core.contracts import StaleOutputError
    from tasks.load_data import load_dataset

    first = load_dataset.fn(run_config("run_name=r", "data.on_bad_rows=drop"))
    written = os.stat(first.train_path).st_mtime_ns
    again = load_dataset.fn(run_config("run_name=r", "data.on_bad_rows=drop"))
    assert again == first and os.stat(first.train_path).st_mtime_ns == written  # reused, not rewritten

    data = tmp_path / "d.jsonl"
    original = data.read_bytes()
    data.write_bytes(original.replace(b"cat", b"dog", 1))  # same size, one word changed
    with pytest.raises(StaleOutputError, match="source_files"):
        load_dataset.fn(run_config("run_name=r", "data.on_bad_rows=drop"))
    data.write_bytes(original)
    assert load_dataset.fn(run_config("run_name=r", "data.on_bad_rows=drop")) == first

    dropping = ("run_name=d", "data.on_bad_rows=drop", "data.long_prompts=drop")
    load_dataset.fn(run_config(*dropping))
    other = tmp_path / "tok2"
    chat_tokenizer.save_pretrained(other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    with pytest.raises(StaleOutputError, match="tokenizer"):
        load_dataset.fn(run_config(*dropping, f"models.tokenizer={other}"))
    # without dropping, the tokenizer does not decide the splits: no tokenizer in the provenance
    assert load_dataset.fn(run_config("run_name=r", "data.on_bad_rows=drop", f"models.tokenizer={other}")) == first


def test_load_dataset_names_a_missing_data_file(run_config, tmp_path):
    pytest.importorskip("prefect")
    from tasks.load_data import load_dataset

    with pytest.raises(DataError, match=r"data file not found: .*missing\.jsonl"):
        load_dataset.fn(run_config(f"data.eval_path={tmp_path / 'missing.jsonl'}"))


def test_a_held_out_file_sharing_samples_with_the_training_file_is_refused(run_config, tmp_path):
    pytest.importorskip("prefect")
    from tasks.load_data import load_dataset

    held = tmp_path / "held.jsonl"
    rows = [{"id": 0, "instruction": "unseen question", "response": "unseen answer"},
            {**GOOD, "id": 1, "instruction": "cat " * 21}]  # row r1 of the training file, under another id
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"held.jsonl: 1 of its 2 held-out samples are also in .*d\.jsonl "
                                        r"\(same prompt and response; the first is id '1'\)"):
        load_dataset.fn(run_config(f"data.eval_path={held}", "data.on_bad_rows=drop"))
    held.write_text(json.dumps(rows[0]) + "\n")
    splits = load_dataset.fn(run_config(f"data.eval_path={held}", "data.on_bad_rows=drop", "run_name=ok"))
    assert (splits.num_train, splits.num_eval) == (40, 1)


def test_a_jsonl_byte_order_mark_empty_files_and_boolean_ids(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "q", "response": "a", "id": "s1"}\n{"prompt": "q2", "response": "b"}\n')
    samples, _ = load_samples(bom)
    assert [s.sample_id for s in samples][0] == "s1" and len(samples) == 2
    bom.write_bytes(b"\xef\xbb\xbf\n" + b'{"prompt": "q", "response": "a", "id": "s1"}\n')  # the mark alone on line 1
    assert [s.sample_id for s in load_samples(bom)[0]] == ["s1"]
    for empty in (tmp_path / "empty.jsonl", tmp_path / "blank.jsonl", tmp_path / "none.parquet"):
        if empty.suffix == ".parquet":
            pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}), empty)
        else:
            empty.write_text("" if empty.name == "empty.jsonl" else "\n\n")
        with pytest.raises(DataError, match=f"{empty.name}: the file holds no rows"):
            load_samples(empty)
    flags = tmp_path / "flags.jsonl"
    flags.write_text('{"prompt": "q", "response": "a", "id": true}\n')
    with pytest.raises(DataError, match=r"flags.jsonl:1: id must be a string or integer, got bool"):
        load_samples(flags)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "q"}\n{"prompt": "q", "response": null}\n')
    with pytest.raises(DataError, match=r"missing.jsonl:1: missing field 'response'"):
        load_samples(missing)
    missing.write_text('{"prompt": "q", "response": null}\n')
    with pytest.raises(DataError, match=r"missing.jsonl:1: null field 'response'"):
        load_samples(missing)
