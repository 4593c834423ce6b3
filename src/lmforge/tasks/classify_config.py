"""Settings of task ``classify`` (the recipe's ``classify:`` section); see :mod:`lmforge.tasks.classify`."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_serializer

from ..config import RunConfig, Section

LOGISTIC = "sklearn.linear_model.LogisticRegression"


class EncoderOptions(Section):
    """The sentence encoder of the embedding methods (embedding_lr, zero_shot, setfit)."""

    pooling: Literal["mean", "cls", "max", "last"] | None = Field(None, description="default: the model's, else mean")
    normalize: bool | None = Field(None, description="L2-normalise embeddings (default: the model's setting)")
    batch_size: int = Field(64, gt=0, description="sentences per forward pass when embedding")


class EmbeddingLRConfig(Section):
    """embedding_lr: frozen embeddings + a scikit-learn classifier."""

    classifier: str = Field(LOGISTIC, description="dotted name of a scikit-learn classifier class")
    kwargs: dict[str, Any] = Field(default_factory=lambda: {"max_iter": 1000}, description="its constructor arguments")
    cache: bool = Field(True, description="cache training-set embeddings on disk, reused across runs")
    per_class: int | None = Field(None, gt=0, description="train on N seeded examples per class (None: all); "
                                  "the few-shot baseline next to SetFit")


class ZeroShotConfig(Section):
    """zero_shot: class prototypes from label descriptions and/or a few labelled examples; cosine decides."""

    label_words: dict[str, str | list[str]] = Field(
        default_factory=dict, description="label -> word(s) put into the templates (default: the label name)")
    templates: list[str] = Field(default_factory=lambda: ["{label}"], min_length=1,
                                 description="description templates with a {label} slot, averaged per class")
    use_descriptions: bool = Field(True, description="build prototypes from the label descriptions")
    shots: int = Field(0, ge=0, description="also average N labelled training examples per class (seeded)")
    temperature: float = Field(0.05, gt=0, description="softmax temperature turning cosines into probabilities")


class SetFitConfig(Section):
    """setfit: contrastive fine-tuning on sampled pairs, then a classification head."""

    per_class: int | None = Field(16, gt=0, description="training examples sampled per class (None: all)")
    num_iterations: int = Field(20, gt=0, description="pairs per example and kind: up to N*iterations each of "
                                                      "positive and negative pairs, deduplicated")
    max_pairs: int | None = Field(None, gt=1, description="bound on the total pair count (half positive)")
    head: Literal["logistic", "linear"] = Field("logistic", description="logistic: scikit-learn classifier on the "
                                                "embeddings; linear: a torch head trained with the engine")
    classifier: str = Field(LOGISTIC, description="head=logistic: dotted scikit-learn classifier")
    kwargs: dict[str, Any] = Field(default_factory=lambda: {"max_iter": 1000})
    head_epochs: float = Field(20.0, gt=0, description="head=linear: epochs over the sampled examples")
    head_lr: float = Field(1e-2, gt=0, description="head=linear: learning rate")


class PromptConfig(Section):
    """prompt: a generative (chat) model scores each label's answer word after a templated question."""

    template: str = Field("Review: {text}\nIs this review positive or negative? Answer with one word.",
                          description="the question; {text} (and {text_pair}) are filled in")
    verbalizers: dict[str, str | list[str]] = Field(
        default_factory=dict, description="label -> answer text(s) scored (default: the label name)")
    system: str | None = Field(None, description="system message (chat models)")
    chat: bool = Field(True, description="render through the tokenizer's chat template when it has one")
    answer_prefix: str = Field("", description="text after the assistant turn opens, before the answer")
    batch_size: int = Field(16, gt=0, description="prompts per forward pass")
    label_by: Literal["score", "generate"] = Field(
        "score", description="text2text: label by scored label words, or by the generated answer")


class ClassifyConfig(Section):
    """Which method classifies, and its options."""

    method: Literal["finetune", "embedding_lr", "zero_shot", "setfit", "prompt", "text2text"] = "finetune"
    mode: Literal["full", "frozen", "lora", "adapter"] = Field(
        "lora", description="finetune: which weights train (lora/adapter: the adapter: section's kind)")
    unfreeze_last: int = Field(0, ge=0, description="frozen mode: also train the last N blocks")
    class_weights: Literal["none", "balanced", "sqrt_balanced"] | dict[str, float] = Field(
        "none", description="finetune: per-class loss weights: balanced (N / (C * n_c) from the training "
                            "labels), sqrt_balanced, or label -> weight")
    focal_gamma: float = Field(0.0, ge=0, description="finetune: focal loss focusing parameter (0: cross-entropy)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="finetune: label smoothing of the targets")
    ordinal: Literal["none", "regression", "cumulative"] = Field(
        "none", description="finetune: labels are ordered (data.labels order is the rank): regression on the "
                            "rank, or cumulative-link logits P(y > k); eval adds MAE and off-by-one accuracy")
    decision_bias: Literal["none", "macro_f1"] = Field(
        "none", description="finetune: fit per-class biases on the log-probabilities that maximise the validation "
                            "split's macro-F1, saved with the weights (decision.json) and used by eval/predict")
    encoder: EncoderOptions = Field(default_factory=EncoderOptions)
    embedding_lr: EmbeddingLRConfig = Field(default_factory=EmbeddingLRConfig)
    zero_shot: ZeroShotConfig = Field(default_factory=ZeroShotConfig)
    setfit: SetFitConfig = Field(default_factory=SetFitConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)

    @model_serializer(mode="wrap")
    def _only_the_method(self, handler):
        """Dump (``config show``, a run's config.yaml) only the chosen method's options; a finetune
        section reads as it always did."""
        return {k: v for k, v in handler(self).items() if k in METHOD_KEYS[self.method]}


METHOD_KEYS = {"finetune": {"mode", "unfreeze_last", "class_weights", "focal_gamma", "label_smoothing", "ordinal",
                                "decision_bias"}, "embedding_lr": {"method", "encoder", "embedding_lr"},
               "zero_shot": {"method", "encoder", "zero_shot"}, "setfit": {"method", "encoder", "setfit"},
               "prompt": {"method", "prompt"}, "text2text": {"method", "prompt"}}


class ClassifyRun(RunConfig):
    task: Literal["classify"] = "classify"
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
