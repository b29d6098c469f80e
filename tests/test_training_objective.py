"""The training objective: what is masked, how the loss is weighted, and the held-out measures."""

from __future__ import annotations

import pytest
import torch

from training.batches import Row, collate, encode_chat, iter_batches, read_jsonl
from training.objective import diffusion_loss, eval_loss, prompt_gain


def test_loss_never_masks_the_prompt_and_weights_by_one_over_t():
    """With a model whose logits are uniform, CE = log V per masked token, so the loss is
    E[sum_masked log V / t / L] = log V per row: masks outside the region would change nothing but
    masks inside must all be counted. We check the masked positions directly instead."""
    from dllm_engine.config import LLaDAConfig
    from dllm_engine.model import DiffusionLM

    cfg = LLaDAConfig(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32, vocab_size=40)
    model = DiffusionLM(cfg)
    seen = {}

    def spy(ids, key_valid=None):
        seen["ids"] = ids.clone()
        return torch.zeros(*ids.shape, cfg.d_model)

    model.forward = spy  # logits of a zero hidden state are uniform: CE = log V everywhere
    rows = [Row([1, 5, 6, 7], [8, 9, 3, 0, 0]), Row([1, 5], [10, 3, 0])]
    batch = collate(rows, pad_id=0)
    gen = torch.Generator().manual_seed(0)
    loss = diffusion_loss(model, batch, mask_id=2, eps=1e-3, gen=gen)
    masked = seen["ids"] == 2
    assert not (masked & ~batch["region"]).any()  # prompt and padding are never masked
    # Recompute t from the same generator: loss = mean over rows of (#masked * log V / t / L).
    gen = torch.Generator().manual_seed(0)
    t = 1e-3 + (1 - 1e-3) * torch.rand(2, 1, generator=gen)
    expected = (masked.sum(1) * torch.log(torch.tensor(40.0)) / t[:, 0] / batch["region"].sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mean_weighting_averages_ce_over_masked_tokens_only():
    """weighting="mean": no 1/t factor, every masked token counts once, whatever its row's t."""
    from dllm_engine.config import LLaDAConfig
    from dllm_engine.model import DiffusionLM

    cfg = LLaDAConfig(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32, vocab_size=40)
    model = DiffusionLM(cfg)
    torch.manual_seed(0)
    proj = torch.randn(cfg.d_model, cfg.d_model)
    seen = {}

    def spy(ids, key_valid=None):
        seen["ids"] = ids.clone()
        return torch.nn.functional.embedding(ids, proj)  # logits differ per input token

    model.forward = spy
    rows = [Row([1, 5, 6, 7], [8, 9, 3, 0, 0]), Row([1, 5], [10, 3, 0, 11, 12, 13])]
    batch = collate(rows, pad_id=0)
    loss = diffusion_loss(model, batch, mask_id=2, eps=0.2, gen=torch.Generator().manual_seed(1), weighting="mean")
    masked = seen["ids"] == 2
    assert masked.any() and not (masked & ~batch["region"]).any()
    logits = model.logits(torch.nn.functional.embedding(seen["ids"], proj))
    expected = torch.nn.functional.cross_entropy(logits[masked], batch["ids"][masked])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_certainty_adds_the_entropy_of_right_predictions_only():
    """certainty > 0: + weight x entropy where the argmax is the target, nothing where it is wrong."""
    from dllm_engine.config import LLaDAConfig
    from dllm_engine.model import DiffusionLM

    cfg = LLaDAConfig(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32, vocab_size=40)
    model = DiffusionLM(cfg)
    rows = [Row([1, 5], [8, 9, 3, 0]), Row([1, 5], [10, 3, 0, 0])]
    batch = collate(rows, pad_id=0)
    hidden = torch.randn(*batch["ids"].shape, cfg.d_model, generator=torch.Generator().manual_seed(0))
    head = model.model.transformer["ff_out"].weight
    hidden[0] += 3 * head[batch["ids"][0]]  # row 0 leans towards its targets, row 1 is random
    logits = model.logits(hidden)
    right = logits.argmax(-1) == batch["ids"]
    assert right[batch["region"]].any() and not right[batch["region"]].all()  # both kinds are scored
    model.forward = lambda ids, key_valid=None: hidden
    loss = lambda c: diffusion_loss(model, batch, mask_id=2, eps=0.999, gen=torch.Generator().manual_seed(1), weighting="mean", certainty=c)
    logp = logits[batch["region"]].log_softmax(-1)  # t ~ U(0.999, 1): every region token is masked
    entropy = -(logp.exp() * logp).sum(-1) * right[batch["region"]]
    assert (loss(0.5) - loss(0.0)).item() == pytest.approx(0.5 * entropy.mean().item(), rel=1e-4)


@pytest.mark.parametrize("layout", [{}, {"block_causal": True}])  # bidirectional; block-causal without shifted logits
def test_drafting_for_verify_needs_a_model_verify_can_decode(layout):
    from dllm_engine.config import ConfigError, LLaDAConfig
    from dllm_engine.model import DiffusionLM

    model = DiffusionLM(LLaDAConfig(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32, vocab_size=40, **layout))
    batch = collate([Row([1, 5], [8, 9, 3, 0])], pad_id=0)
    with pytest.raises(ConfigError, match="drafting for self-speculation trains a block-causal model with shifted logits"):
        diffusion_loss(model, batch, mask_id=2, eps=0.5, gen=torch.Generator().manual_seed(1), block_size=2, weighting="mean", ar_weight=1.0)


def test_block_masking_matches_semi_autoregressive_decoding():
    """Clean before the drawn block, fully masked after it, partly masked inside; never past the first EOS block."""
    from dllm_engine.config import LLaDAConfig
    from dllm_engine.model import DiffusionLM

    cfg = LLaDAConfig(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32, vocab_size=40)
    model = DiffusionLM(cfg)
    seen = []
    model.forward = lambda ids, key_valid=None: seen.append(ids.clone()) or torch.zeros(*ids.shape, cfg.d_model)
    eos = 3
    region = [10, 11, 12, 13, 14, 15, eos, eos, eos, eos, eos, eos]  # first EOS at 6: blocks of 4 -> start 0 or 4
    batch = collate([Row([1, 5], region)], pad_id=0)
    starts = set()
    for seed in range(40):
        diffusion_loss(model, batch, mask_id=2, eps=1e-3, gen=torch.Generator().manual_seed(seed), block_size=4, eos_id=eos)
        m = (seen[-1][0, 2:] == 2).tolist()
        start = next(b for b in (0, 4, 8) if all(m[b + 4 :]) and not any(m[:b]))
        starts.add(start)
    assert starts == {0, 4}


def test_prompt_gain_reuses_the_fully_masked_loss_of_the_eval(tiny_chat):
    """The training eval hands prompt_gain its own ratio-1.0 loss: it must be the value prompt_gain computes."""
    from dllm_engine.loading import load_model

    model, tok = load_model(tiny_chat / "model", dtype="float32")
    rows, _ = encode_chat(tok, read_jsonl(tiny_chat / "data" / "eval.jsonl"), 32, 64)
    rows = sorted(rows, key=len)
    assert len(rows) > 1
    sp = tok.special
    ev = eval_loss(model, list(iter_batches(rows, 32, sp.pad)), sp.mask, [0.5, 1.0], sp.eos)
    fresh = prompt_gain(model, rows, sp.mask, sp.eos, sp.pad)
    assert fresh == prompt_gain(model, rows, sp.mask, sp.eos, sp.pad, own=ev["reply_loss@1"])
