"""X-STA components: sharing, teaching and aligning (Cao et al. 2023).

One encoder reads a source-language example (English by default) and its target-language
parallel. Notation: h_S, h_T hidden states [B, J, H], [B, I, H]; sg = stop-gradient.

- Sharing (`KnowledgeSharingLayer`): at one encoder layer the target attends to a corrected,
  gradient-blocked copy of the source; `XstaEncoder` runs a Hugging Face QA model on
  (source, target) pairs with that layer in place.
- Teaching (`TeacherGuidedCalibration`): attention from the target's final states to the
  source's carries the source's answer distribution over to the target positions (p_T|S);
  a loss on it (gamma = 0.1), and at inference p~_T = (p_T|S + p_T) / 2.
- Aligning: sentence-level InfoNCE on mean-pooled states (`sentence_infonce`) and token-level
  alignment entropy (`token_alignment`, through the fused kernel).
- `xsta_loss` adds the parts; each is switched off by a zero weight (the paper's ablations).

Where the paper and the public code (alibaba/EasyNLP, examples/X-STA) differ, the paper is
the default and the code an option; each function says which. Where the paper itself can be
read two ways, the reading taken is a documented choice, the other an option:
- Which layer's states token alignment reads: the paper's entropy names h_T and h_S without
  a layer. Taken: the final layer's (`XstaEncoder(alignment_layer="final")`), the states the
  QA head and sentence alignment read. Option "share": the states entering the
  knowledge-sharing layer, where the public code takes its entropy (from that layer's
  cross-attention probabilities).
- Whose statistics the calibration's normalisation keeps. Taken: one set per side
  (`TeacherGuidedCalibration(norm_stats="side")`). The source side is one language; the
  target side pools the batch's target languages, as batches here mix them (the public code
  batches one language pair and keeps a set per language id; a set per language here would
  need language ids at inference, for test languages never trained on too). Option
  "shared": one set over both sides' tokens.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dist_xqa import kernels
from dist_xqa.losses import masked_log_softmax, mean_over_valid_rows, span_nll

MIX_TARGETS = ("self", "cross")
ALIGNMENT_VARIANTS = ("masked", "pair")
ALIGNMENT_LAYERS = ("final", "share")
NORM_STATS = ("side", "shared")


def additive_mask(tokens: Tensor, dtype: torch.dtype) -> Tensor:
    """Hugging Face's extended attention mask [B, 1, 1, L] from a bool token mask [B, L]:
    0 where a key may be attended, the most negative value where it may not."""
    return (~tokens)[:, None, None, :].to(dtype) * torch.finfo(dtype).min


# --- sharing ---------------------------------------------------------------------------------


class KnowledgeSharingLayer(nn.Module):
    """Gradient-disentangled knowledge sharing around one Hugging Face encoder layer.

    `layer` is a BertLayer (or any layer with the same parts: `attention.self`,
    `attention.output`, `feed_forward_chunk`, as XLM-R's). The source runs through it
    unchanged. For the target:

        h~_S   = sg(h_S) + f(sg(h_S), sg(h_T))   if S != T  (f: dropout + linear on [h_S; h_T],
                                                  token by token: both padded to one length)
               = h_S                              if S == T  (per example)
        self   = SelfAttention(h_T)               the layer's own attention, before its output
        cross  = CrossAttention(q = h_T, kv = h~_S)   its own multi-head attention
        mixed  = (1 - lambda) * cross + lambda * self,   lambda = w * lambda0 + b
        h_T^{l+1} = FFN(LayerNorm(Dense(mixed) + h_T))  the layer's own output block and FFN

    So the mix sits on the attention context vectors, before the attention output projection,
    its residual connection and LayerNorm, and before the feed-forward block: exactly where the
    layer's self-attention output would be. The cross-attention starts as a copy of the layer's
    self-attention weights (the public code reuses the self-attention module itself); f starts
    from PyTorch's default initialisation, as in the public code. It is computed here from the
    copy's query, key and value maps (`cross_attend`), not by calling the copy: Hugging Face
    releases differ in which argument masks cross-attention keys (4.46 reads
    `encoder_attention_mask` and ignores `attention_mask` there; 4.57 reads `attention_mask`
    and refuses the other), and either mistake lets the target attend to the source's padding.
    `mix_on="cross"` applies lambda to the cross-attention instead (the public code:
    lambda * cross + (1 - lambda) * self). `gradient_disentangled=False` is the paper's
    "w/o GDKS" ablation: h~_S = h_S for every pair (plain cross-attention, no f).
    """

    def __init__(
        self,
        layer: nn.Module,
        hidden_size: int,
        dropout: float,
        lambda0: float = 0.3,
        mix_on: str = "self",
        gradient_disentangled: bool = True,
    ):
        super().__init__()
        if mix_on not in MIX_TARGETS:
            raise ValueError(f"mix_on must be one of {MIX_TARGETS}, got {mix_on!r}")
        self.layer = layer
        self.cross_attention = copy.deepcopy(layer.attention.self)
        self.correction = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden_size, hidden_size))
        # shape [1], not a scalar: DeepSpeed broadcasts parameters as bytes, which 0-d tensors refuse
        self.w = nn.Parameter(torch.ones(1))
        self.b = nn.Parameter(torch.zeros(1))
        self.lambda0 = lambda0
        self.mix_on = mix_on
        self.gradient_disentangled = gradient_disentangled

    @property
    def mix_weight(self) -> Tensor:
        """lambda = w * lambda0 + b (trainable w, b)."""
        return self.w * self.lambda0 + self.b

    def shared_source(self, h_src: Tensor, h_tgt: Tensor, same_language: Tensor) -> Tensor:
        """h~_S: the source states the target attends to; same_language [B] bool."""
        if not self.gradient_disentangled:
            return h_src
        if h_src.shape != h_tgt.shape:
            raise ValueError(f"knowledge sharing: f reads source and target token by token, so both must be "
                             f"padded to one length; got {tuple(h_src.shape)} and {tuple(h_tgt.shape)}")
        src, tgt = h_src.detach(), h_tgt.detach()
        corrected = src + self.correction(torch.cat([src, tgt], dim=-1))
        return torch.where(same_language[:, None, None], h_src, corrected)

    def cross_attend(self, h_tgt: Tensor, shared: Tensor, src_mask: Tensor) -> Tensor:
        """Multi-head attention, queries from h_T [B, I, H], keys and values from h~_S [B, J, H],
        with the additive source mask [B, 1, 1, J]: the context vectors [B, I, H], as the
        layer's self-attention returns them (absolute positions: Hugging Face's own
        cross-attention uses no relative position scores either)."""
        attention = self.cross_attention
        heads, size = attention.num_attention_heads, attention.attention_head_size

        def split(x: Tensor) -> Tensor:
            return x.view(x.shape[0], x.shape[1], heads, size).transpose(1, 2)  # [B, heads, n, d]

        q, k, v = split(attention.query(h_tgt)), split(attention.key(shared)), split(attention.value(shared))
        scores = q @ k.transpose(-1, -2) / math.sqrt(size) + src_mask
        weights = attention.dropout(torch.softmax(scores, dim=-1))
        return (weights @ v).transpose(1, 2).reshape(h_tgt.shape[0], h_tgt.shape[1], heads * size)

    def mix(self, cross: Tensor, self_attended: Tensor) -> Tensor:
        lam = self.mix_weight
        if self.mix_on == "cross":
            return lam * cross + (1 - lam) * self_attended
        return (1 - lam) * cross + lam * self_attended

    def forward(
        self, h_src: Tensor, h_tgt: Tensor, src_tokens: Tensor, tgt_tokens: Tensor, same_language: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(h_S^{l+1}, h_T^{l+1}) from h_S [B, J, H], h_T [B, I, H], bool token masks [B, J],
        [B, I] (True = real token) and same_language [B] bool (S == T for that pair)."""
        src_mask, tgt_mask = additive_mask(src_tokens, h_src.dtype), additive_mask(tgt_tokens, h_tgt.dtype)
        next_src = self.layer(h_src, attention_mask=src_mask)[0]
        attention = self.layer.attention
        self_attended = attention.self(h_tgt, attention_mask=tgt_mask)[0]
        shared = self.shared_source(h_src, h_tgt, same_language)
        cross = self.cross_attend(h_tgt, shared, src_mask)
        attended = attention.output(self.mix(cross, self_attended), h_tgt)
        return next_src, self.layer.feed_forward_chunk(attended)


def default_share_layer(num_layers: int) -> int:
    """The sharing layer (counted from 1) when none is given: two thirds of the depth,
    rounded (the paper's 8 of 12), at least 1."""
    return max(1, round(2 * num_layers / 3))


class XstaOutput(NamedTuple):
    src_start: Tensor  # [B, L] QA logits of the source side
    src_end: Tensor
    tgt_start: Tensor
    tgt_end: Tensor
    h_src: Tensor  # [B, L, H] final hidden states
    h_tgt: Tensor
    align_src: Tensor  # [B, L, H] the states token alignment reads (see XstaEncoder)
    align_tgt: Tensor


class XstaEncoder(nn.Module):
    """A Hugging Face extractive-QA model (BERT / XLM-R style: `base_model.embeddings`,
    `base_model.encoder.layer`, `qa_outputs`) run on (source, target) pairs, with
    KnowledgeSharingLayer around its layer `share_layer` (counted from 1).

    Source and target go through the layers before and after the sharing layer as one
    batch [2B]; both sides must be padded to one length. `qa` keeps its own weights and
    layout (the sharing layer holds the same layer module, not a copy), so `qa` alone
    saves and loads in Hugging Face format: run on a target alone it is the encoder +
    QA head without the cross-attention (its self-attention output passes unmixed).

    alignment_layer: the states the output offers token alignment (`align_src`, `align_tgt`):
    "final", the final layer's (the reading taken, see the module docstring), or "share",
    those entering the sharing layer (h_S^l, h_T^l: what its cross-attention reads).
    """

    def __init__(self, qa: nn.Module, share_layer: int | None = None, lambda0: float = 0.3,
                 mix_on: str = "self", gradient_disentangled: bool = True, alignment_layer: str = "final"):
        super().__init__()
        if alignment_layer not in ALIGNMENT_LAYERS:
            raise ValueError(f"alignment_layer must be one of {ALIGNMENT_LAYERS}, got {alignment_layer!r}")
        self.alignment_layer = alignment_layer
        layers = qa.base_model.encoder.layer
        share_layer = default_share_layer(len(layers)) if share_layer is None else share_layer
        if not 1 <= share_layer <= len(layers):
            raise ValueError(f"share_layer must be in 1..{len(layers)} (the encoder's layers), got {share_layer}")
        self.qa = qa
        self.share_index = share_layer - 1
        config = qa.config
        self.sharing = KnowledgeSharingLayer(layers[self.share_index], config.hidden_size, config.hidden_dropout_prob,
                                             lambda0, mix_on, gradient_disentangled)

    def forward(self, src: dict[str, Tensor], tgt: dict[str, Tensor], same_language: Tensor) -> XstaOutput:
        """src and tgt: model inputs (input_ids, attention_mask, token_type_ids) [B, L] each;
        same_language [B] bool."""
        base = self.qa.base_model
        b = src["input_ids"].shape[0]
        both = {k: torch.cat([src[k], tgt[k]]) for k in src if k != "attention_mask"}
        tokens = torch.cat([src["attention_mask"], tgt["attention_mask"]]).bool()
        h = base.embeddings(input_ids=both["input_ids"], token_type_ids=both.get("token_type_ids"))
        mask = additive_mask(tokens, h.dtype)
        for i, layer in enumerate(base.encoder.layer):
            if i == self.share_index:
                entering = h
                h_src, h_tgt = self.sharing(h[:b], h[b:], tokens[:b], tokens[b:], same_language)
                h = torch.cat([h_src, h_tgt])
            else:
                h = layer(h, attention_mask=mask)[0]
        start, end = self.qa.qa_outputs(h).split(1, dim=-1)
        start, end = start.squeeze(-1), end.squeeze(-1)
        aligned = h if self.alignment_layer == "final" else entering
        return XstaOutput(start[:b], end[:b], start[b:], end[b:], h[:b], h[b:], aligned[:b], aligned[b:])


# --- teaching --------------------------------------------------------------------------------


class MaskedBatchNorm(nn.Module):
    """(h - mean) / sqrt(var + eps) per hidden unit, no affine parameters.

    Training: mean and (biased) variance over every real token of the batch, padding
    excluded (pooled over tokens; the public code averages per-example means). The running
    statistics follow them with `momentum` (0.1, the public code); inference uses the running
    statistics, which start at mean 0 and variance 1 (identity before any training step).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-8, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(hidden_size))
        self.register_buffer("running_var", torch.ones(hidden_size))

    def forward(self, h: Tensor, tokens: Tensor) -> Tensor:
        if self.training:
            weight = tokens[..., None].to(h.dtype)
            count = weight.sum().clamp(min=1)
            mean = (h * weight).sum((0, 1)) / count
            var = (((h - mean) ** 2) * weight).sum((0, 1)) / count
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.to(h.dtype), self.running_var.to(h.dtype)
        return (h - mean) / torch.sqrt(var + self.eps)


def renormalize(p: Tensor, valid: Tensor) -> Tensor:
    """p restricted to the valid positions and rescaled to sum to 1 there (0 elsewhere)."""
    p = torch.where(valid, p, 0.0)
    return p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)


class TeacherGuidedCalibration(nn.Module):
    """Attentive teacher-guided calibration: p_T|S [B, I] for the start and the end.

    Target final states (query) attend over the source's (key) with `heads` heads; the value
    at source token j is the source model's own detached answer distribution p_S(j) (start
    and end, softmax over the source's valid positions). Averaging over heads gives
    p_T|S(i) = mean_h sum_j a^h_ij p_S(j), renormalised over the target's valid positions
    (context and CLS). Query and key inputs are first normalised with batch token
    statistics (`MaskedBatchNorm`, eps = 1e-8; `normalize=False` is the "w/o normalisation"
    ablation): one set per side (norm_stats "side", the reading taken; see the module
    docstring), or one set over both sides' tokens ("shared"). Only the calibration sees the
    normalised states: the QA head reads the encoder's own, so the saved encoder + QA head
    alone gives p_T (the public code feeds the normalised states to the QA head too). The
    public code attends over the source's logits as values; the paper (default) over its
    distribution.
    """

    def __init__(self, hidden_size: int, heads: int, dropout: float = 0.1, eps: float = 1e-8,
                 normalize: bool = True, norm_stats: str = "side"):
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of the {heads} heads")
        if norm_stats not in NORM_STATS:
            raise ValueError(f"norm_stats must be one of {NORM_STATS}, got {norm_stats!r}")
        self.heads = heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        per_side, shared = normalize and norm_stats == "side", normalize and norm_stats == "shared"
        self.norm_src = MaskedBatchNorm(hidden_size, eps) if per_side else None
        self.norm_tgt = MaskedBatchNorm(hidden_size, eps) if per_side else None
        self.norm = MaskedBatchNorm(hidden_size, eps) if shared else None

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, h = x.shape
        return x.view(b, n, self.heads, h // self.heads).transpose(1, 2)  # [B, heads, n, d]

    def normalized(self, h_tgt: Tensor, h_src: Tensor, tgt_tokens: Tensor,
                   src_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(h_T, h_S) as the attention reads them: normalised per side, over both sides
        together, or as given."""
        if self.norm is not None:  # one set of statistics: the two sides' tokens side by side
            both = self.norm(torch.cat([h_tgt, h_src], dim=1), torch.cat([tgt_tokens, src_tokens], dim=1))
            return both[:, :h_tgt.shape[1]], both[:, h_tgt.shape[1]:]
        if self.norm_src is not None:
            return self.norm_tgt(h_tgt, tgt_tokens), self.norm_src(h_src, src_tokens)
        return h_tgt, h_src

    def forward(
        self,
        h_tgt: Tensor,
        h_src: Tensor,
        tgt_tokens: Tensor,
        src_tokens: Tensor,
        tgt_positions: Tensor,
        src_positions: Tensor,
        src_start_logits: Tensor,
        src_end_logits: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """(p_T|S start, p_T|S end), each [B, I], summing to 1 over tgt_positions."""
        h_tgt, h_src = self.normalized(h_tgt, h_src, tgt_tokens, src_tokens)
        q, k = self._split_heads(self.query(h_tgt)), self._split_heads(self.key(h_src))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~src_tokens[:, None, None, :], torch.finfo(scores.dtype).min)
        attention = self.dropout(torch.softmax(scores, dim=-1))  # [B, heads, I, J]
        value = torch.stack(
            [masked_log_softmax(logits.detach(), src_positions).exp()
             for logits in (src_start_logits, src_end_logits)], dim=-1
        ).to(attention.dtype)  # [B, J, 2]
        carried = (attention @ value[:, None]).mean(1)  # [B, I, 2]
        return renormalize(carried[..., 0], tgt_positions), renormalize(carried[..., 1], tgt_positions)


def teacher_guided_loss(p_start: Tensor, p_end: Tensor, positions: Tensor, start_pos: Tensor,
                        end_pos: Tensor) -> Tensor:
    """L_tg: NLL of the target's gold start and end under p_T|S, averaged like span_nll."""
    row_valid = positions.any(-1)

    def nll(p: Tensor, gold: Tensor) -> Tensor:
        picked = p.gather(-1, gold[:, None]).squeeze(-1).clamp(min=torch.finfo(p.dtype).tiny)
        return mean_over_valid_rows(-picked.log(), row_valid)

    return (nll(p_start, start_pos) + nll(p_end, end_pos)) / 2


def calibrated_scores(tgt_logits: Tensor, p_tgt_given_src: Tensor, positions: Tensor) -> Tensor:
    """Inference: log p~_T with p~_T = (p_T|S + p_T) / 2, p_T = softmax(tgt_logits) over the
    valid positions. A log-probability per position, used by span decoding in place of the
    logits (start + end scores add as logits do); invalid positions get the most negative
    value."""
    p_tgt = masked_log_softmax(tgt_logits, positions).exp()
    mixed = (p_tgt_given_src.to(p_tgt.dtype) + p_tgt) / 2
    low = torch.finfo(mixed.dtype).min
    return torch.where(positions, mixed.clamp(min=torch.finfo(mixed.dtype).tiny).log(), low)


# --- aligning --------------------------------------------------------------------------------


def mean_pool(h: Tensor, tokens: Tensor) -> Tensor:
    """Mean of the real tokens' states: [B, H]."""
    weight = tokens[..., None].to(h.dtype)
    return (h * weight).sum(1) / weight.sum(1).clamp(min=1)


def sentence_infonce(h_src: Tensor, h_tgt: Tensor, src_tokens: Tensor, tgt_tokens: Tensor,
                     tau: float = 0.05, groups: Tensor | None = None) -> Tensor:
    """Sentence-level InfoNCE: each source's mean-pooled state must pick its own target among
    the batch's targets (in-batch negatives) by cosine similarity / tau. Differentiable in
    both sides. The public code passes both pooled vectors through a dense + tanh head
    first; here they are compared as pooled (the paper's description).

    groups [B] (optional): an id per row, equal for rows of the same example. The paper's
    negatives are other examples, but a batch drawn from every (source, target) pair can hold
    one example several times ((en, de), (en, es), (en, en) of one id): its other rows'
    targets are translations of the row's own, so their columns are left out of the row's
    denominator; the row's own target (the diagonal) always stays.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    src, tgt = mean_pool(h_src, src_tokens), mean_pool(h_tgt, tgt_tokens)
    similarity = nn.functional.cosine_similarity(src[:, None], tgt[None], dim=-1).float() / tau
    labels = torch.arange(similarity.shape[0], device=similarity.device)
    if groups is not None:
        same_example = (groups[:, None] == groups[None, :]) & (labels[:, None] != labels[None, :])
        similarity = similarity.masked_fill(same_example, float("-inf"))
    return nn.functional.cross_entropy(similarity, labels)


def token_alignment(h_tgt: Tensor, h_src: Tensor, tgt_tokens: Tensor, src_tokens: Tensor,
                    variant: str = "masked", impl: str | None = None) -> Tensor:
    """Token-level alignment entropy on (h_T, sg(h_S)) through dist_xqa.kernels.

    masked (default, the paper): the mean over real target tokens of the entropy of each
    target token's alignment over the real source tokens. pair (the public code): every
    query row counts, padding included, and the transposed term (source tokens aligned over
    target tokens, sg on the source again) is added. The public code takes the transposed
    entropies on the columns of the same head-averaged attention, which are not
    distributions; here each direction is a proper softmax, as the kernel computes it.
    """
    if variant not in ALIGNMENT_VARIANTS:
        raise ValueError(f"variant must be one of {ALIGNMENT_VARIANTS}, got {variant!r}")
    src = h_src.detach()
    if variant == "masked":
        return kernels.alignment_entropy(h_tgt, src, tgt_tokens, src_tokens, impl=impl)
    every_tgt, every_src = torch.ones_like(tgt_tokens), torch.ones_like(src_tokens)
    return (kernels.alignment_entropy(h_tgt, src, every_tgt, src_tokens, impl=impl)
            + kernels.alignment_entropy(src, h_tgt, every_src, tgt_tokens, impl=impl))


# --- the total ------------------------------------------------------------------------------


class XstaLoss(NamedTuple):
    """The X-STA loss and its parts, each logged as student/loss/<part> (0 when switched off)."""

    total: Tensor
    mrc_src: Tensor
    mrc_tgt: Tensor
    teacher_guided: Tensor
    sentence: Tensor
    token: Tensor


class Span(NamedTuple):
    """One side of a pair: QA logits, masks and labels, final hidden states."""

    start_logits: Tensor  # [B, L]
    end_logits: Tensor
    positions: Tensor  # [B, L] bool: context and CLS
    tokens: Tensor  # [B, L] bool: real tokens (the attention mask)
    start_pos: Tensor  # [B]
    end_pos: Tensor
    hidden: Tensor  # [B, L, H], final layer: sentence alignment pools it
    aligned: Tensor | None = None  # [B, L, H], what token alignment reads (XstaOutput.align_*), else hidden


def xsta_loss(
    src: Span,
    tgt: Span,
    calibrated: tuple[Tensor, Tensor] | None = None,
    *,
    alpha: float = 0.2,
    gamma: float = 0.1,
    sentence_weight: float = 0.05,
    token_weight: float = 0.05,
    infonce_tau: float = 0.05,
    alignment: str = "masked",
    groups: Tensor | None = None,
    impl: str | None = None,
) -> XstaLoss:
    """alpha * MRC_src + (1 - alpha) * MRC_tgt + gamma * L_tg + w_s * InfoNCE + w_t * entropy.

    `calibrated` is (p_T|S start, p_T|S end) from TeacherGuidedCalibration; None or gamma = 0
    leaves the teacher-guided term out ("w/o calibration"). A zero weight skips a term's
    computation ("w/o sentence / token alignment"). `groups` [B]: the example of each pair,
    so that InfoNCE takes no other view of a row's own example as a negative (see
    sentence_infonce). Paper values as defaults.
    """
    zero = src.start_logits.new_zeros((), dtype=torch.float32)
    mrc_src = span_nll(src.start_logits, src.end_logits, src.positions, src.start_pos, src.end_pos)
    mrc_tgt = span_nll(tgt.start_logits, tgt.end_logits, tgt.positions, tgt.start_pos, tgt.end_pos)
    guided = zero
    if calibrated is not None and gamma:
        guided = teacher_guided_loss(*calibrated, tgt.positions, tgt.start_pos, tgt.end_pos)
    sentence = (sentence_infonce(src.hidden, tgt.hidden, src.tokens, tgt.tokens, infonce_tau, groups)
                if sentence_weight else zero)
    token = zero
    if token_weight:
        h_tgt, h_src = (tgt.hidden, src.hidden) if tgt.aligned is None else (tgt.aligned, src.aligned)
        token = token_alignment(h_tgt, h_src, tgt.tokens, src.tokens, alignment, impl)
    total = (alpha * mrc_src + (1 - alpha) * mrc_tgt + gamma * guided
             + sentence_weight * sentence + token_weight * token)
    return XstaLoss(total, mrc_src, mrc_tgt, guided, sentence, token)
