"""The LM head at chosen positions, exactly as the model's own forward applies it.

Scoring, the teacher cache and the distillation step run the vocabulary projection only where a
response token is predicted: ``output_embeddings(hidden[positions])``. Some architectures change the
logits after that projection; ``head_logits`` applies the ones Hugging Face models use:

* ``final_logit_softcapping`` (Gemma 2/3): ``cap · tanh(logits / cap)``;
* ``logit_scale`` (Cohere): ``logits · scale``;
* ``logits_scaling`` (Granite): ``logits / scaling``.

``check_head`` compares this path with the model's full forward on a few tokens, so an
architecture with any other post-processing is refused at load time instead of training on wrong
logits.
"""

from __future__ import annotations

import torch


def _text_config(lm: torch.nn.Module):
    config = lm.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_logits(lm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [..., V] of the causal LM ``lm`` for final hidden states ``hidden`` [..., H]."""
    logits = lm.get_output_embeddings()(hidden)
    config = _text_config(lm)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        logits = logits / scaling
    return logits


@torch.no_grad()
def check_head(lm: torch.nn.Module, name: str, probe_tokens: int = 6) -> None:
    """Raise ValueError when ``head_logits`` differs from ``lm``'s own logits on a short probe.

    ``name`` (the model's path) goes into the message. Runs one forward of ``probe_tokens`` tokens in
    eval mode (the module's training flag is restored).
    """
    weight = lm.get_output_embeddings().weight
    device, vocab = weight.device, weight.shape[0]
    ids = (torch.arange(probe_tokens, device=device) * 7919 + 11).remainder(vocab).unsqueeze(0)
    if lm.base_model is lm:
        raise ValueError(f"{name}: {type(lm).__name__} has no separate decoder (base_model is the model itself); "
                         "the response-position head needs one")
    was_training = lm.training
    lm.eval()
    try:
        full = lm(input_ids=ids, use_cache=False, return_dict=True).logits[0].float()
        hidden = lm.base_model(input_ids=ids, use_cache=False, return_dict=True).last_hidden_state[0]
        ours = head_logits(lm, hidden).float()
    finally:
        lm.train(was_training)
    if not torch.isfinite(full).all():
        raise ValueError(f"{name}: the model's own logits are not finite on a short probe in {weight.dtype} "
                         "(overflow? try models.teacher_dtype=float32 or bfloat16)")
    err = (full - ours).abs().max().item()
    tol = (1e-4 if weight.dtype == torch.float32 else 2e-2) * (1 + full.abs().max().item())
    if not err <= tol:
        raise ValueError(
            f"{name}: the model's logits are not its output embedding applied to the final hidden states "
            f"(max difference {err:.3g} on a probe; {type(lm).__name__} post-processes them in a way this "
            "project does not reproduce). Supported: plain heads, final_logit_softcapping, logit_scale, "
            "logits_scaling")
