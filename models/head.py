"""The morphology head: pooled DINOv2 tokens to per-question logits, vote fractions and Dirichlet concentrations."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from models.backbone import build_backbone, pool_tokens, pooled_size
from models.config import HeadConfig, ModelConfig
from models.dann import reverse_gradient
from sharding.schema import FeatureSchema, load_schema

# exp(+-10) keeps concentrations in [4.5e-5, 2.2e4]: lgamma stays finite and accurate in float32.
LOGIT_BOUND = 10.0


@dataclass(frozen=True)
class OutputLayout:
    """Which raw head output is which: the schema's named answers, then one "other" per incomplete question.

    The head emits F + K raw logits: the schema's F named answers in schema order, then one "other" logit for
    each of the K `other_questions`, whose named answers do not cover all native answers (bulge-size keeps
    `none` and `dominant` of 4-5). A question's fractions are the softmax over its named logits plus its other
    logit: named fractions of a complete question sum to 1, those of an incomplete one to 1 - other, as its
    labels do. The public output is the F named logits only; for an incomplete question they are the named
    logits minus its other logit (other as reference class), so `fractions` recovers exact fractions from them.
    Dirichlet concentrations need the raw logits: `model(images, with_other=True)`.
    """
    schema: FeatureSchema
    other_questions: tuple[str, ...]

    def __post_init__(self):
        unknown = [q for q in self.other_questions if q not in self.schema.question_names]
        if unknown:
            raise ValueError(f"head.other_questions {unknown} are not questions of the {self.schema.name} schema "
                             f"{self.schema.question_names}")

    @property
    def names(self) -> list[str]:
        return self.schema.names

    @property
    def num_features(self) -> int:
        return len(self.schema.features)

    @property
    def num_questions(self) -> int:
        return len(self.schema.questions)

    @property
    def num_outputs(self) -> int:
        return self.num_features + len(self.other_questions)

    def question_slices(self) -> list[tuple[str, slice]]:
        return self.schema.question_slices()

    def other_column(self, question: str) -> int | None:
        """Column of a question's "other" logit in the raw output, None for a complete question."""
        if question not in self.other_questions:
            return None
        return self.num_features + self.other_questions.index(question)

    @cached_property
    def feature_question(self) -> torch.Tensor:
        """(F, Q) float one-hot: feature j belongs to question q; `x @ it` sums features per question."""
        out = torch.zeros(self.num_features, self.num_questions)
        for q, (_, sl) in enumerate(self.question_slices()):
            out[sl, q] = 1.0
        return out

    @cached_property
    def other_question(self) -> torch.Tensor:
        """(K, Q) float one-hot: other logit k belongs to question q."""
        out = torch.zeros(len(self.other_questions), self.num_questions)
        for k, question in enumerate(self.other_questions):
            out[k, self.schema.question_names.index(question)] = 1.0
        return out


def _check_width(logits: torch.Tensor, layout: OutputLayout, allowed: tuple[int, ...]) -> None:
    if logits.shape[-1] not in allowed:
        raise ValueError(f"logits have {logits.shape[-1]} columns; expected {' or '.join(map(str, allowed))} "
                         f"({layout.num_features} named answers + {len(layout.other_questions)} other)")


def fractions(logits: torch.Tensor, layout: OutputLayout) -> torch.Tensor:
    """(N, F) vote fractions from public (N, F) or raw (N, F + K) logits: a softmax per question.

    Named fractions of a complete question sum to 1; those of an incomplete one sum to 1 - its other fraction.
    """
    _check_width(logits, layout, (layout.num_features, layout.num_outputs))
    raw = logits.shape[-1] == layout.num_outputs
    parts = []
    for question, sl in layout.question_slices():
        named = logits[..., sl]
        column = layout.other_column(question)
        if column is None:
            parts.append(named.softmax(dim=-1))
            continue
        other = logits[..., column:column + 1] if raw else torch.zeros_like(named[..., :1])
        parts.append(torch.cat([named, other], dim=-1).softmax(dim=-1)[..., :-1])
    return torch.cat(parts, dim=-1)


def public_logits(raw: torch.Tensor, layout: OutputLayout) -> torch.Tensor:
    """(N, F + K) raw logits to the (N, F) named logits, other as the reference class of incomplete questions."""
    _check_width(raw, layout, (layout.num_outputs,))
    named = raw[..., :layout.num_features]
    if not layout.other_questions:
        return named
    # (N, K) other logits spread to the (N, F) features of their questions; 0 for complete questions.
    per_question = raw[..., layout.num_features:] @ layout.other_question.to(raw)
    return named - per_question @ layout.feature_question.to(raw).T


def concentrations(raw: torch.Tensor, layout: OutputLayout) -> torch.Tensor:
    """(N, F + K) Dirichlet concentrations exp(logit), named answers then others.

    exp makes the Dirichlet mean alpha_j / sum(alpha) exactly the per-question softmax (within the clamp), so the
    fractions the MSE loss trains and eval reports are the mean of what the Dirichlet-multinomial loss trains.
    """
    _check_width(raw, layout, (layout.num_outputs,))
    return raw.clamp(-LOGIT_BOUND, LOGIT_BOUND).exp()


def incomplete_questions(features: torch.Tensor, feature_mask: torch.Tensor, schema: FeatureSchema,
                         tolerance: float = 1e-3) -> list[str]:
    """Questions whose named fractions sum to less than 1 for some galaxy that has all of their answers.

    A check of `head.other_questions` against real labels; questions no galaxy fully answers are not listed.
    """
    features = torch.as_tensor(features, dtype=torch.float64)
    feature_mask = torch.as_tensor(feature_mask, dtype=torch.bool)
    out = []
    for question, sl in schema.question_slices():
        complete_rows = feature_mask[:, sl].all(dim=1)
        sums = features[complete_rows, sl].sum(dim=1)
        if len(sums) and bool((sums < 1 - tolerance).any()):
            out.append(question)
    return out


def build_head(in_features: int, cfg: HeadConfig, num_outputs: int) -> nn.Sequential:
    """MLP: (Linear, LayerNorm, GELU, Dropout) per hidden size, then a Linear to the raw logits.

    Without hidden layers, a dropout > 0 applies to the pooled features before the output layer (a linear probe
    with dropout), so `head.dropout` is never silently ignored; at 0 the head is the bare Linear.
    """
    layers: list[nn.Module] = []
    width = in_features
    for hidden in cfg.hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(cfg.dropout)]
        width = hidden
    if not cfg.hidden_sizes and cfg.dropout > 0:
        layers.append(nn.Dropout(cfg.dropout))
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


class MorphologyModel(nn.Module):
    """DINOv2 backbone + morphology head; outputs are named by `output_names` (= schema.names)."""

    def __init__(self, config: ModelConfig, schema: FeatureSchema | None = None):
        super().__init__()
        self.config = config
        self.layout = OutputLayout(schema or load_schema(), tuple(config.head.other_questions))
        self.backbone = build_backbone(config)
        self.head = build_head(pooled_size(config), config.head, self.layout.num_outputs)
        self.discriminator: nn.Module | None = None  # DANN training's survey discriminator (models.dann)

    @property
    def schema(self) -> FeatureSchema:
        return self.layout.schema

    @property
    def output_names(self) -> list[str]:
        return self.layout.names

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images to the (N, D) pooled backbone features the head reads (embeddings, neighbours)."""
        return pool_tokens(self.backbone(pixel_values=images).last_hidden_state, self.config.pooling)

    def forward(self, images: torch.Tensor, with_other: bool = False,
                domain_lambda: float | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) images to (N, F) named logits, or the (N, F + K) raw logits with `with_other`.

        With `domain_lambda` (DANN training), also the discriminator's (N, surveys) logits of the pooled features
        behind a gradient reversal of that strength: one pass, inside the module DeepSpeed wraps."""
        pooled = self.embed(images)
        raw = self.head(pooled)
        logits = raw if with_other else public_logits(raw, self.layout)
        if domain_lambda is None:
            return logits
        return logits, self.discriminator(reverse_gradient(pooled, domain_lambda))

    def fractions(self, logits: torch.Tensor) -> torch.Tensor:
        return fractions(logits, self.layout)
