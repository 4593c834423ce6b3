"""Generated topic labels: the few-shot prompt, the clean-up, and the check that a label names
its own topic (else the topic keeps its keywords)."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lmforge.topics.pipeline import describe
from lmforge.topics.represent import LABEL_SHOTS, clean_label, label_prompt, labels_identify_topics


def test_labels_identify_topics_by_hand():
    topics = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    labels = np.array([[0.9, 0.1, 0], [0.1, 0, 0.8], [0.2, 0.7, 0.1]])  # near 0, near 2, near 1
    assert labels_identify_topics(labels, topics, [0, 1, 1]).tolist() == [True, False, True]


def test_label_prompt_is_a_few_shot_completion():
    p = label_prompt([f"w{i}" for i in range(12)], ["Storm closes roads in the north today again and again", "x"])
    assert p.endswith("Topic:") and p.count("Topic:") == len(LABEL_SHOTS) + 1
    assert "w7" in p and "w8" not in p  # eight keywords at most
    assert "Storm closes roads in the north today again and again; x" in p


def test_a_copied_example_label_falls_back():
    copied = LABEL_SHOTS[0][2]
    assert clean_label(f" {copied.upper()}", "kw") == "kw"
    assert clean_label(" Storm damage in the north", "kw") == "Storm damage in the north"


def test_describe_keeps_only_labels_that_name_their_topic():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 5
    emb = np.concatenate([c + rng.normal(scale=0.1, size=(6, 8)) for c in centres]).astype(np.float32)
    a = np.repeat([0, 1, 2], 6)
    doc_term = sp.csr_matrix(rng.poisson(1.0, size=(18, 5)))
    where = {"alpha news": 0, "beta news": 1, "gamma news": 2}

    def word_embed(texts):  # a label's embedding: the centre of the topic it names
        return np.stack([centres[where[t]] if t in where else np.ones(8) for t in texts]).astype(np.float32)

    answers = [" alpha news", " alpha news", "The topic is"]  # in topic order; the 2nd names topic 0's subject

    def labeller(prompts):
        return answers[:len(prompts)]

    m = describe(a, doc_term, [f"v{i}" for i in range(5)], emb, {"top_n_words": 3, "vectorizer": {}},
                 texts=[f"doc {i}" for i in range(18)], word_embed=word_embed, labeller=labeller)
    labels = {t: m.label(t) for t in m.real_topics}
    t_alpha, t_beta, t_gamma = (int(m.assignments[i]) for i in (0, 6, 12))
    assert labels[t_alpha] == "alpha news"
    assert labels[t_beta] != "alpha news" and t_beta not in m.labels        # wrong subject: keywords
    assert t_gamma not in m.labels                                           # filler only: keywords
