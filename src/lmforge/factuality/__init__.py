"""Factuality tuning (Tian et al. 2023, "Fine-tuning Language Models for Factuality").

Sample N answers per prompt (:mod:`.sampler`), score each one -- against references with a claim
checker (:mod:`.claims`, :mod:`.checkers`, :mod:`.scoring`) or by the share of its equivalence
class among the samples -- turn score gaps into preference pairs for the ``preference`` task
(:mod:`.pairs`), and measure held-out questions before and after (:mod:`.evaluate`).
:mod:`.pipeline` holds the file stages of ``lmforge factuality``; :mod:`.experiment` chains them.
"""
