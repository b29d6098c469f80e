"""The training objective (LLaDA SFT, see `diffusion_loss`) and the held-out measures of it.

Per row t ~ U(eps, 1); each reply-region token is replaced by the mask token with probability t;
the loss is the cross-entropy on masked tokens weighted 1/t and normalized by the reply-region
length, averaged over rows (`loss_weighting = "mean"`: the plain mean CE over masked tokens).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from dllm_engine.config import ConfigError
from dllm_engine.model import DiffusionLM

from .batches import Row, iter_batches


def denoise_hidden(
    model: DiffusionLM, noisy: torch.Tensor | list[torch.Tensor], batch: dict[str, torch.Tensor], block_size: int | None = None, drafting: bool = False
) -> torch.Tensor | list[torch.Tensor]:
    """The hidden state that predicts each token (N, T, d) for the partly masked `noisy` ids of a
    collated batch (a list of noisy copies: one hidden tensor per copy).

    A bidirectional model: one plain forward per copy. A block-causal one (`LLaDAConfig.block_causal`):
    every reply block's loss in one forward (BD3-LM's vectorized training) over [prompt, clean
    reply, noisy reply, ...], where the prompt sees itself (with `turn_blocks`, each turn itself and
    the turns before it; with `causal_prompt`, each token those before it), a clean block the prompt
    and the clean blocks up to it, and a noisy block the prompt, the clean blocks before it and
    itself (its own copy): what decoding meets at each block. `block_size` None: the whole reply is
    one block. With shifted logits (`shift_logits`) a token is predicted by the state one position
    before it: a block's first token by the clean state before the block (the AR prediction, as
    decoding takes it from the forward that settled the block before), the others by their noisy
    neighbours.

    `drafting` (shifted logits only): as self-speculation (`policy="verify"`) decodes, the clean reply
    is token-causal like the prompt, and one more hidden tensor follows the copies' (a list is
    returned): each reply token's state in the clean reply, the model's causal prediction of it.
    """
    copies = noisy if isinstance(noisy, list) else [noisy]
    ids, region, key_valid = batch["ids"], batch["region"], batch["key_valid"]
    cfg = model.config
    if drafting and not (cfg.block_causal and cfg.shift_logits):
        raise ConfigError("drafting for self-speculation trains a block-causal model with shifted logits (an AR checkpoint converted)")
    if not cfg.block_causal:
        if cfg.shift_logits:
            raise ConfigError("training a bidirectional model with shifted logits (Dream) is not implemented")
        out = [model(x, key_valid=key_valid) for x in copies]
        return out if isinstance(noisy, list) else out[0]
    n, t = ids.shape
    c = len(copies)
    dev = ids.device
    start, length = region.long().argmax(1), region.sum(1)  # each row's reply span
    r = int(length.max())
    j = torch.arange(r, device=dev)
    src = (start[:, None] + j).clamp(max=t - 1)
    in_reply = j < length[:, None]
    block = block_size or t
    zeros = torch.zeros((n, r * c), dtype=torch.bool, device=dev)
    prompt = torch.cat([key_valid & ~region, zeros], 1)
    clean = torch.cat([region, zeros], 1)
    noise = torch.cat([torch.zeros_like(region), in_reply.repeat(1, c)], 1)
    valid = torch.cat([key_valid, in_reply.repeat(1, c)], 1)
    blk = torch.cat([(torch.arange(t, device=dev) - start[:, None]).clamp(min=0) // block, (j // block).repeat(c).expand(n, r * c)], 1)
    copy = torch.cat([torch.zeros(t, dtype=torch.long, device=dev), torch.arange(1, c + 1, device=dev).repeat_interleave(r)]).expand(n, -1)
    q, k = (lambda x: x[:, :, None]), (lambda x: x[:, None, :])
    at = torch.arange(t + r * c, device=dev)
    before, same = k(blk) < q(blk), (k(blk) == q(blk)) & (k(copy) == q(copy))
    if cfg.turn_blocks:  # a prompt position sees the turns up to its own
        ends = (ids == cfg.end_of_turn_token_id) & ~region
        turn = torch.cat([ends.cumsum(1) - ends.long(), zeros.long()], 1)
        sees_prompt = k(prompt) & (~q(prompt) | (k(turn) <= q(turn)))
    elif cfg.causal_prompt:  # a prompt position sees the tokens up to its own
        sees_prompt = k(prompt) & (~q(prompt) | (at[None, None, :] <= at[None, :, None]))
    else:
        sees_prompt = k(prompt)
    if drafting:  # a clean token sees the clean ones up to its own
        clean_sees = (before & q(noise)) | (q(clean) & (at[None, None, :] <= at[None, :, None]))
    else:  # a clean block sees itself and the clean blocks before it
        clean_sees = before | (same & q(clean))
    sees = sees_prompt | (k(clean) & ~q(prompt) & clean_sees) | (k(noise) & q(noise) & same)
    attn = (sees | ~q(valid)) & k(valid)  # padding queries see every real key: no empty softmax row
    pos = torch.cat([torch.arange(t, device=dev).expand(n, t), src.repeat(1, c)], 1)
    hidden = model(torch.cat([ids] + [x.gather(1, src) for x in copies], 1), pos, attn)
    if cfg.shift_logits:  # a block's first token: the clean state before the block
        before_block = hidden[:, :t].gather(1, (src - 1).clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
    out = []
    for i in range(c):
        states = hidden[:, t + i * r : t + (i + 1) * r]
        if cfg.shift_logits:  # any other: the noisy state before it
            states = torch.where((j % block == 0)[None, :, None], before_block, torch.cat([states[:, :1], states[:, :-1]], 1))
        out.append(hidden[:, :t].masked_scatter(region[..., None], states[in_reply]))
    if drafting:  # every reply token from the clean state before it
        out.append(hidden[:, :t].masked_scatter(region[..., None], before_block[in_reply]))
    return out if isinstance(noisy, list) or drafting else out[0]


def diffusion_loss(
    model: DiffusionLM,
    batch: dict[str, torch.Tensor],
    mask_id: int,
    eps: float,
    gen: torch.Generator,
    block_size: int | None = None,
    eos_id: int | None = None,
    weighting: str = "elbo",
    certainty: float = 0.0,
    complementary: bool = False,
    ar_weight: float | None = None,
) -> torch.Tensor:
    """LLaDA SFT loss: mask each region token w.p. t ~ U(eps, 1); CE on masked tokens / t / region length.
    With `weighting="mean"`, the mean CE over all masked tokens of the batch instead.

    A block-causal model is scored on every block at once with `block_size` its attention blocks
    (`denoise_hidden`), each block with a masking rate of its own; `complementary` adds a second
    noisy copy masked where the first is not (Fast-dLLM v2), so every reply token is scored once.
    For a bidirectional one, with `block_size`, the
    noise is the one semi-autoregressive decoding meets instead: per row a
    block-aligned window of the region up to the block holding the first EOS is drawn; tokens
    before it are clean, tokens after it fully masked, and inside it each token is masked w.p. t.
    The loss covers the window's masked tokens (weighted 1/t, normalized by the block size). A small
    model learns the distribution it is decoded from much faster than the whole-reply one.

    `certainty` > 0 adds that multiple of the predictive entropy at each scored position whose
    argmax is already the target (TrainConfig.certainty_weight), weighted like its cross-entropy.

    `ar_weight` (not None): trains drafts for self-speculation (TiDAR): the clean reply is
    token-causal (`denoise_hidden(drafting=True)`) and that multiple of the mean causal cross-entropy
    of every reply token is added, which keeps the predictions that verification commits the model's own.
    """
    ids, region = batch["ids"], batch["region"]
    n, width = ids.shape
    dev = ids.device  # random draws come from the CPU generator: the same masks on any device
    at = torch.cumsum(region, 1) - 1  # position within the region
    if model.config.block_causal and block_size is not None:  # a rate per block
        rates = eps + (1 - eps) * torch.rand(n, width // block_size + 1, generator=gen)
        t = rates.to(dev).gather(1, at.clamp(min=0) // block_size)
    else:
        t = (eps + (1 - eps) * torch.rand(n, 1, generator=gen)).to(dev).expand(n, width)
    coin = torch.rand(ids.shape, generator=gen).to(dev) < t
    if block_size is None or model.config.block_causal:
        masked = region & coin
        scored, norm = masked, region.sum(1, keepdim=True)
    else:
        eos = region & (ids == eos_id)
        first_eos = torch.where(eos.any(1), torch.where(eos, at, ids.shape[1]).min(1).values, region.sum(1) - 1)
        n_blocks = first_eos // block_size + 1
        start = (torch.rand(n, generator=gen).to(dev) * n_blocks).long().clamp(max=n_blocks - 1)[:, None] * block_size
        window = region & (at >= start) & (at < start + block_size)
        masked = (window & coin) | (region & (at >= start + block_size))
        scored, norm = window & coin, torch.full((n, 1), block_size, device=dev)
    views = [(masked, scored, t)]
    if complementary:
        if not model.config.block_causal:
            raise ConfigError("complementary masks are trained for block-causal models")
        views.append((region & ~masked, region & ~masked, (1 - t).clamp(min=eps)))
    hiddens = denoise_hidden(model, [torch.where(m, mask_id, ids) for m, _, _ in views], batch, block_size, drafting=ar_weight is not None)
    causal = ar_weight * F.cross_entropy(model.logits(hiddens.pop()[region]).float(), ids[region]) if ar_weight is not None else 0.0
    ces, bounds = [], []
    for hidden, (_, scored, rate) in zip(hiddens, views):
        logp = model.logits(hidden[scored]).float().log_softmax(-1)
        ce = F.nll_loss(logp, ids[scored], reduction="none")  # = cross_entropy, with logp kept for the entropy
        if certainty:
            right = logp.argmax(-1) == ids[scored]
            ce = ce + certainty * right * -(logp.exp() * logp).sum(-1)
        ces.append(ce)
        bounds.append((ce * (1 / rate / norm)[scored]).sum() / n)  # each view an estimate of the bound
    if weighting == "mean":
        ce = torch.cat(ces)
        return ce.sum() / max(ce.numel(), 1) + causal
    return sum(bounds) / len(bounds) + causal


@torch.no_grad()
def eval_loss(model: DiffusionLM, batches: list[dict[str, torch.Tensor]], mask_id: int, ratios: list[float], eos_id: int, seed: int = 1234, autocast: bool = False) -> dict[str, float]:
    """Mean CE per masked token at fixed mask ratios (same masks every call).

    `loss@r` averages over all masked region tokens (EOS padding included, as trained);
    `reply_loss@r` over masked reply tokens only (the reply and its end of turn, not the padding).
    A block-causal model sees the reply as one block here, the nearest to a bidirectional one's view.
    """
    was_training = model.training
    model.eval()
    out = {}
    for r in ratios:
        gen = torch.Generator().manual_seed(seed)
        tot = tot_reply = 0.0
        cnt = cnt_reply = 0
        for b in batches:
            ids, region = b["ids"], b["region"]
            masked = region & (torch.rand(ids.shape, generator=gen).to(ids.device) < r)
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
                hidden = denoise_hidden(model, torch.where(masked, mask_id, ids), b)
                ce = F.cross_entropy(model.logits(hidden[masked]).float(), ids[masked], reduction="none")
            reply = ids[masked] != eos_id
            tot, cnt = tot + ce.sum().item(), cnt + ce.numel()
            tot_reply, cnt_reply = tot_reply + ce[reply].sum().item(), cnt_reply + int(reply.sum())
        out[f"loss@{r:g}"] = tot / max(cnt, 1)
        out[f"reply_loss@{r:g}"] = tot_reply / max(cnt_reply, 1)
    out["loss"] = sum(out[f"loss@{r:g}"] for r in ratios) / len(ratios)
    model.train(was_training)
    return out


def prompt_gain(model: DiffusionLM, rows: list[Row], mask_id: int, eos_id: int, pad_id: int, autocast: bool = False, own: float | None = None) -> dict[str, float]:
    """How much the prompt helps: the fully masked reply loss with each row's own prompt, with
    another row's (a fixed shuffle), and their difference. 0 means the model ignores the prompt.

    `own`: the first of these when the caller has it already (`eval_loss` at ratio 1.0 over the
    same rows sorted by length, in batches of 32: the same batches, the same value)."""
    regions = [r.region for r in rows]
    random.Random(0).shuffle(regions)
    swapped = [Row(r.prompt, region) for r, region in zip(rows, regions)]
    device = next(model.parameters()).device

    def fully_masked(rs: list[Row]) -> float:
        return eval_loss(model, list(iter_batches(sorted(rs, key=len), 32, pad_id, device)), mask_id, [1.0], eos_id, autocast=autocast)["reply_loss@1"]

    own = fully_masked(rows) if own is None else own
    other = fully_masked(swapped)
    return {"reply_loss@1": own, "reply_loss@1_other_prompt": other, "prompt_gain": other - own}
