import json
import logging
import math

import pytest
import torch

from pocl_core.data import (DataError, Sample, cap_samples, dataset_fingerprint, load_samples, split_holdout,
                            stable_sample_id)
from pocl_core.encoding import collate, encode_sample, left_pad


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_dolly_alpaca_and_plain_fields(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Sum", "context": "1 and 2", "response": "3"},
        {"instruction": "Greet", "input": "", "output": "hi", "id": 7},
        {"prompt": "Q", "response": "A", "sample_id": "x"},
        {"prompt": "Q2", "response": "A2", "sample_id": None, "id": "y"},  # a null sample_id defers to id
        {"prompt": "Q3", "response": "A3", "sample_id": None},
    ])
    samples, dropped = load_samples(p)
    assert dropped == 0
    assert samples[3].sample_id == "y" and samples[4].sample_id == stable_sample_id("Q3", "A3")
    assert samples[0] == Sample(stable_sample_id("Sum\n\n1 and 2", "3"), "Sum\n\n1 and 2", "3")
    assert samples[1].sample_id == "7" and samples[1].prompt == "Greet" and samples[1].response == "hi"
    assert samples[2].sample_id == "x"


@pytest.mark.parametrize("row, message", [
    ({"instruction": "x"}, "missing field 'response'"),
    ({"instruction": "x", "response": 3}, "field 'response' must be a string"),
    ({"instruction": "x", "response": "  "}, "empty response"),
    ({"text": "x"}, "no known fields"),
    ("{not json", "not valid JSON"),
    ('["a"]', "not an object"),
    ('{"prompt": "a\\ud83d", "response": "b"}', r"field 'prompt' is not valid Unicode text: a lone surrogate '\\ud83d' at character 1"),
    ('{"prompt": "a", "response": "b", "id": "s\\udc00"}', "field 'id' is not valid Unicode text"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "response": "fine"}, row])
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
        load_samples(p)
    samples, dropped = load_samples(p, on_bad_rows="drop")
    assert len(samples) == 1 and dropped == 1


def test_duplicate_ids_and_undecodable_bytes(tmp_path):
    p = write_jsonl(tmp_path / "dup.jsonl", [{"prompt": "a", "response": "b", "id": 1}, {"prompt": "c", "response": "d", "id": 1}])
    with pytest.raises(DataError, match=r"dup.jsonl:2: duplicate sample id '1' \(first at .*dup.jsonl:1\)"):
        load_samples(p)
    raw = tmp_path / "bytes.jsonl"
    raw.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "b"}\n')
    with pytest.raises(DataError, match=r"bytes.jsonl:2: not valid UTF-8"):
        load_samples(raw)


def test_zero_usable_samples_and_missing_file(tmp_path):
    p = write_jsonl(tmp_path / "none.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError, match="no usable samples"):
        load_samples(p, on_bad_rows="drop")
    with pytest.raises(DataError, match="not found"):
        load_samples(tmp_path / "absent.jsonl")


def test_dropped_rows_are_named_in_the_no_samples_error_and_in_a_warning(tmp_path, caplog):
    p = write_jsonl(tmp_path / "fields.jsonl", [{"text": f"t{i}"} for i in range(20)])
    with pytest.raises(DataError) as err:
        load_samples(p, on_bad_rows="drop")
    assert str(err.value) == (f"{p}: no usable samples (20 bad rows dropped; the first: {p}:1: no known fields "
                              "(expected Dolly instruction/context/response, Alpaca instruction/input/output, or "
                              "prompt/response); found ['text'])")
    rows = [{"prompt": "a", "response": "b"}, *[{"prompt": f"p{i}"} for i in range(5)]]
    q = write_jsonl(tmp_path / "some.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="pocl"):
        assert load_samples(q, on_bad_rows="drop")[1] == 5
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"{q}: dropped 5 bad row(s) (data.on_bad_rows=drop): {q}:2: missing field 'response'; "
                              f"{q}:3: missing field 'response'; {q}:4: missing field 'response'; and 2 more")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pocl"):
        load_samples(write_jsonl(tmp_path / "clean.jsonl", [{"prompt": "a", "response": "b"}]), on_bad_rows="drop")
    assert not caplog.records


def test_split_and_cap_do_not_depend_on_order(tiny_data_path):
    samples, _ = load_samples(tiny_data_path)
    train, held = split_holdout(samples, 0.1)
    train2, held2 = split_holdout(list(reversed(samples)), 0.1)
    assert {s.sample_id for s in held} == {s.sample_id for s in held2}
    assert len(train) + len(held) == len(samples)
    n = len(samples)  # each id is held out with probability 0.1: binomial, mean 0.1·n, sd sqrt(0.09·n)
    assert abs(len(held) - 0.1 * n) <= 4 * math.sqrt(0.09 * n)
    many = [Sample(f"id-{i}", "p", "r") for i in range(5000)]  # 500 ± 4·21
    assert abs(len(split_holdout(many, 0.1)[1]) - 500) <= 4 * math.sqrt(450)
    assert {s.sample_id for s in cap_samples(train, 10)} == {s.sample_id for s in cap_samples(train2, 10)}
    assert dataset_fingerprint(train) == dataset_fingerprint(train2)
    assert dataset_fingerprint(train) != dataset_fingerprint(train[1:])


def test_encoding_masks_prompt_and_truncates(tiny_models):
    from pocl_core.models import load_tokenizer

    tok = load_tokenizer(str(tiny_models.student))
    s = Sample("a", "Repeat the word apple.", "apple")
    e = encode_sample(tok, s, "### Instruction:\n{prompt}\n\n### Response:\n", 64, 96)
    assert e.input_ids[0] == tok.bos_token_id and e.input_ids[-1] == tok.eos_token_id
    assert tok.decode(e.input_ids[e.n_prompt:], skip_special_tokens=True) == "apple"
    short = encode_sample(tok, s, "{prompt}", 3, 5)
    assert short.n_prompt == 3 and len(short.input_ids) == 5
    batch = collate([e, short], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(e.input_ids))
    assert batch["target_mask"][0].sum() == e.n_response and batch["target_mask"][1].sum() == 2
    assert torch.equal(batch["attention_mask"][1], torch.tensor([1] * 5 + [0] * (len(e.input_ids) - 5)))


def test_left_pad_puts_every_next_token_in_the_last_column():
    ids, attn = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert attn.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == attn.dtype == torch.long
    with pytest.raises(ValueError, match="no prompts"):
        left_pad([], pad_id=0)


@pytest.mark.parametrize("template", ["### Instruction:\n{prompt}\n\n### Response:\n", "chat"])
def test_a_long_prompt_loses_the_start_of_its_text_not_the_template(tiny_models, template):
    """Truncation keeps BOS, the template's framing (instruction header / chat turn markers) and the
    response header, and the end of the user's text."""
    from pocl_core.encoding import encode_prompt
    from pocl_core.models import load_tokenizer

    tok = load_tokenizer(str(tiny_models.student))
    if template == "chat":  # a minimal chat template on the tiny tokenizer: BOS, user turn, assistant header
        tok.chat_template = ("{{ bos_token }}{% for m in messages %}<user> {{ m['content'] }} </user>{% endfor %}"
                             "{% if add_generation_prompt %} <assistant>{% endif %}")
    words = [f"word{i}" for i in range(60)]
    short = encode_prompt(tok, "x", template, 400)
    full = encode_prompt(tok, " ".join(words), template, 400)
    limit = len(full) - 25
    cut = encode_prompt(tok, " ".join(words), template, limit)
    assert len(cut) <= limit and cut[0] == tok.bos_token_id
    head = next(i for i, (a, b) in enumerate(zip(short, full)) if a != b)  # the template's tokens before the text
    tail = next(i for i, (a, b) in enumerate(zip(reversed(short), reversed(full))) if a != b)  # ... and after it
    assert head >= 1 and tail >= 1
    assert cut[:head] == short[:head] and cut[-tail:] == short[-tail:]
    text = tok.decode(cut[head:len(cut) - tail])
    assert "word59" in text and "word0 " not in text  # the end of the prompt survives, its start goes
    # a template with no room left for text: the rendered tokens are cut, BOS kept
    tiny = encode_prompt(tok, " ".join(words), template, 4)
    assert len(tiny) == 4 and tiny[0] == tok.bos_token_id
