"""Sentiment service: `bentoml serve serving.text_service:SentimentClassifier`.

The serving core (serving/service_factory.py) with the text adapter; `SentimentModel` is the
model process of the split topology (None in the in-process one).
"""

from servable.config import TextServeSettings
from serving.adapters.text import TextAdapter
from serving.service_factory import build

SentimentClassifier, SentimentModel = build(TextAdapter, TextServeSettings())
