"""Settings of task ``topics`` (the recipe's ``topics:`` section); see :mod:`lmforge.tasks.topics`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import RunConfig, Section


class EncoderSettings(Section):
    pooling: Literal["mean", "cls", "max", "last"] | None = Field(None, description="default: the model's")
    normalize: bool | None = None
    max_length: int | None = Field(None, gt=0, description="tokens per document (default: the model's)")
    batch_size: int = Field(64, gt=0)
    cache: bool = Field(True, description="cache document embeddings in ~/.cache/lmforge/embeddings")


class ReductionSettings(Section):
    method: Literal["umap", "pca", "svd", "none"] = "umap"
    n_neighbors: int = Field(15, gt=1)
    n_components: int = Field(5, gt=0)
    min_dist: float = Field(0.0, ge=0)
    metric: str = "cosine"
    deterministic: bool = Field(True, description="umap: seeded and single-threaded, the same topics bit for bit "
                                "(false: umap-learn's multi-threaded layout without a seed, faster, not reproducible)")


class ClusteringSettings(Section):
    method: Literal["hdbscan", "kmeans"] = "hdbscan"
    min_cluster_size: int = Field(10, gt=1)
    min_samples: int | None = Field(None, gt=0)
    n_clusters: int = Field(20, gt=1, description="kmeans only")


class VectorizerSettings(Section):
    ngram_range: tuple[int, int] = (1, 1)
    stop_words: str | list[str] | None = "english"
    min_df: int | float = Field(2, gt=0)
    max_df: int | float = Field(1.0, gt=0)
    max_features: int | None = Field(None, gt=0)


class KeywordSettings(Section):
    candidates: int = Field(30, ge=0, description="c-TF-IDF words re-ranked by similarity to the topic (0: off)")
    top_n: int = Field(10, gt=0)
    diversity: float | None = Field(0.3, ge=0, le=1, description="MMR lambda (None or 0: pure re-ranking)")


class LabelSettings(Section):
    generate: bool = Field(False, description="label each topic with a causal model")
    model: str = "smollm2"
    max_new_tokens: int = Field(16, gt=0)
    batch_size: int = Field(8, gt=0)


class TopicsConfig(Section):
    """The topic pipeline (see lmforge.topics.pipeline)."""

    extra_text_columns: list[str] = Field(default_factory=list, description="prepended to the text (e.g. title)")
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    reduction: ReductionSettings = Field(default_factory=ReductionSettings)
    clustering: ClusteringSettings = Field(default_factory=ClusteringSettings)
    vectorizer: VectorizerSettings = Field(default_factory=VectorizerSettings)
    keywords: KeywordSettings = Field(default_factory=KeywordSettings)
    labels: LabelSettings = Field(default_factory=LabelSettings)
    top_n_words: int = Field(10, gt=0)
    representative_docs: int = Field(3, gt=0)
    nr_topics: int | None = Field(None, gt=0, description="merge the most similar topics down to N")
    outlier_target: float | None = Field(None, ge=0, lt=1, description="reassign outliers down to this rate")
    predict_threshold: float | None = Field(None, description="cosine below which predict gives -1 (default: 5th "
                                            "percentile of the fitted members)")
    time_bins: int = Field(10, gt=0)
    stability_seeds: int = Field(3, ge=0, description="seeds for the ARI/NMI stability report (0/1: off)")
    pictures: bool = True
    map_projection: Literal["auto", "umap", "pca"] = Field(
        "auto", description="2-D projection of the documents map (auto: umap after umap reduction, else pca)")


class TopicsRun(RunConfig):
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
