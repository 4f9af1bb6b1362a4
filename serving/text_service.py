"""Sentiment service: `bentoml serve serving.text_service:SentimentClassifier`.

`SentimentModel` is the model process of the split topology (None in the in-process one).
"""

from servable.config import TextServeSettings
from serving.adapters.text import TextAdapter
from serving.model_service import ModelService, serve


class SentimentClassifier(ModelService):
    """Servable sentiment classifier: the sentiment of English texts over REST and V2, with explanations."""

    adapter = TextAdapter
    settings = TextServeSettings()


SentimentClassifier, SentimentModel = serve(SentimentClassifier)
