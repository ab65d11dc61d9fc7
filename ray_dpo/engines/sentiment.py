"""A ready-made function judge: how positive a completion reads (VADER sentiment).

    online.judge.function: ray_dpo.engines.sentiment:positive_sentiment

The DPO paper's controlled-sentiment task: the policy continues the opening words of a
movie review and is rewarded for positive sentiment. Only the completion is scored, never
the prompt, so a negative opening continued positively scores high.

The score is VADER's compound score in [-1, 1] (Hutto & Gilbert 2014; a lexicon and rules,
no model weights, deterministic, fast on a CPU): -1 most negative, 0 neutral or no
sentiment words, +1 most positive. ``pip install vaderSentiment`` (ray_dpo[real]).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:
        raise ImportError("ray_dpo.engines.sentiment needs the vaderSentiment package: "
                          "pip install vaderSentiment (ray_dpo[real] installs it)") from err
    return SentimentIntensityAnalyzer()


def positive_sentiment(prompt: Any, completion: str) -> float:
    """VADER compound score of ``completion`` in [-1, 1]; ``prompt`` is not scored."""
    del prompt
    return float(_analyzer().polarity_scores(completion)["compound"])
