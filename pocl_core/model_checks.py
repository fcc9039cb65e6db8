"""Checks of the configured model and tokenizer folders from their files alone, before any model loads.

A local folder of ``models.teacher`` / ``models.student`` must hold a ``config.json`` whose positions
fit the longest sequences the run feeds it; a ``models.tokenizer`` folder must hold tokenizer files;
``data.prompt_template: chat`` needs a chat template in the tokenizer's folder. Hub ids (``org/name``)
are left to the loaders. Each problem is a ConfigError naming the setting.
"""

from __future__ import annotations

import json
from pathlib import Path

from pocl_core.config import ConfigError, PoclConfig
from pocl_core.data import CHAT_TEMPLATE, relative_path_note
from pocl_core.measures import GENERATIVE_MEASURES
from pocl_core.models import TOKENIZER_FILES, trained_context


def looks_local(value: str) -> bool:
    """A path rather than a Hugging Face hub id (``org/name``)."""
    return "://" not in value and (value.startswith(("/", ".", "~")) or value.count("/") > 1)


def check_model_folders(cfg: PoclConfig, keys: tuple[str, ...]) -> None:
    """ConfigError for a local folder of ``models.<key>`` that is not there, a model folder without its
    config.json or with fewer positions than the run needs (``check_context``), a tokenizer folder
    without tokenizer files, or a chat prompt template the tokenizer's folder has no template for."""
    for key in keys:
        value = getattr(cfg.models, key)
        if value is None or not looks_local(value):
            continue
        folder = Path(value).expanduser()
        if not folder.exists():
            raise ConfigError(f"models.{key}: folder {value} not found{relative_path_note(value)} (the shipped "
                              "configs' models are built by `make tiny-models` / `make quickstart-models`; a "
                              "Hugging Face hub id is org/name)")
        if not folder.is_dir():
            continue
        if key != "tokenizer":
            if not (folder / "config.json").is_file():
                raise ConfigError(f"models.{key}: {value} holds no config.json, so it is no Hugging Face model "
                                  "folder (save_pretrained writes one)")
            check_context(cfg, key, folder / "config.json")
        holds_tokenizer = any((folder / f).is_file() for f in TOKENIZER_FILES)
        if key == "tokenizer" and not holds_tokenizer:
            raise ConfigError(f"models.tokenizer: {value} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                              "...; save_pretrained of a tokenizer writes them)")
        if holds_tokenizer and value == cfg.models.tokenizer_source and cfg.data.prompt_template == CHAT_TEMPLATE \
                and not _has_chat_template(folder):  # no tokenizer at all: the loader says so, naming the folder
            raise ConfigError(f"data.prompt_template is '{CHAT_TEMPLATE}' but the tokenizer in {value} "
                              f"(models.{key}) has no chat template; use a format string with '{{prompt}}' instead")


def _has_chat_template(folder: Path) -> bool:
    """True when a tokenizer folder holds a chat template: its own file, or ``chat_template`` in
    tokenizer_config.json (an unreadable config counts as holding one: the loader reports it)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError):
        return True


def longest_sequences(cfg: PoclConfig, key: str) -> list[tuple[str, int]]:
    """The longest token sequences a run feeds the model of ``models.<key>``, each with the settings that
    make it: training (data.max_length; GKD's on-policy samples are capped by it too), and prompt plus
    generation where a step generates (evaluation; rouge_l scoring, for the scoring model)."""
    d = cfg.data
    out = [("data.max_length", d.max_length),
           ("data.max_prompt_length + eval.max_new_tokens", d.max_prompt_length + cfg.eval.max_new_tokens)]
    if GENERATIVE_MEASURES.intersection(cfg.scoring.measures) and key == cfg.scoring.model:
        out.append(("data.max_prompt_length + scoring.generation.max_new_tokens",
                    d.max_prompt_length + cfg.scoring.generation.max_new_tokens))
    return out


def check_context(cfg: PoclConfig, key: str, config_json: Path) -> None:
    """ConfigError when a sequence of ``longest_sequences`` is longer than the positions the model of
    ``models.<key>`` (its ``config_json``) was built for; nothing when the file does not say."""
    try:
        context = trained_context(json.loads(config_json.read_text()))
    except (OSError, ValueError, AttributeError):
        return  # an unreadable config is the model loader's to report, naming the folder
    if context is None:
        return
    for settings, length in longest_sequences(cfg, key):
        if length > context:
            raise ConfigError(f"{settings} = {length} tokens, more than the {context} positions models.{key} "
                              f"{getattr(cfg.models, key)} was built for (its config.json): lower them")
