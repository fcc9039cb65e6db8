"""Content fingerprints: files, folders, model and tokenizer folders."""

from __future__ import annotations

import hashlib

import pytest

from pocl_core.fingerprints import path_fingerprint
from pocl_core.models import model_fingerprint, tokenizer_fingerprint


def test_file_fingerprint_follows_the_bytes_not_the_timestamp(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"x": 1}\n')
    before = path_fingerprint(f)
    f.write_bytes(b'{"x": 1}\n')  # rewritten, same bytes
    assert path_fingerprint(f) == before
    f.write_bytes(b'{"x": 2}\n')
    assert path_fingerprint(f) != before
    # independent formula: sha256 over the name and the bytes, 16 hex digits
    assert path_fingerprint(f) == hashlib.sha256(b'a.jsonl{"x": 2}\n').hexdigest()[:16]


def test_folder_fingerprint_covers_nested_files_names_and_bytes(tmp_path):
    (tmp_path / "ds" / "sub").mkdir(parents=True)
    (tmp_path / "ds" / "state.json").write_text("{}")
    (tmp_path / "ds" / "sub" / "data-00000.arrow").write_bytes(b"\x00\x01")
    base = path_fingerprint(tmp_path / "ds")
    (tmp_path / "ds" / "sub" / "data-00000.arrow").write_bytes(b"\x00\x02")
    changed = path_fingerprint(tmp_path / "ds")
    (tmp_path / "ds" / "sub" / "data-00000.arrow").rename(tmp_path / "ds" / "sub" / "data-00001.arrow")
    renamed = path_fingerprint(tmp_path / "ds")
    assert len({base, changed, renamed}) == 3
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        path_fingerprint(tmp_path / "nothing")


def test_model_fingerprint_keeps_its_format_and_ignores_other_files(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    expected = hashlib.sha256(b'config.json{"a": 1}model.safetensorsweights').hexdigest()[:16]
    assert model_fingerprint(str(tmp_path)) == expected  # run folders made earlier keep their keys
    (tmp_path / "README.md").write_text("notes")
    assert model_fingerprint(str(tmp_path)) == expected
    assert model_fingerprint("org/some-model") == "hub:org/some-model"
    # modelling code that trust_remote_code would run is part of the model
    (tmp_path / "modeling_custom.py").write_text("SCALE = 1.0\n")
    with_code = model_fingerprint(str(tmp_path))
    (tmp_path / "modeling_custom.py").write_text("SCALE = 2.0\n")
    assert len({expected, with_code, model_fingerprint(str(tmp_path))}) == 3


def test_tokenizer_fingerprint_reads_only_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        tokenizer_fingerprint(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"v": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    base = tokenizer_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert tokenizer_fingerprint(str(tmp_path)) == base
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    assert tokenizer_fingerprint(str(tmp_path)) != base
    assert tokenizer_fingerprint("org/tok") == "hub:org/tok"
