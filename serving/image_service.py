"""Image classification service: `bentoml serve serving.image_service:ImageClassifier`.

`ImageModel` is the model process of the split topology (None in the in-process one).
"""

from servable.config import ImageServeSettings
from serving.adapters.image import ImageAdapter
from serving.model_service import ModelService, serve


class ImageClassifier(ModelService):
    """Servable image classifier: top-k labels of images over REST and V2, with explanations."""

    adapter = ImageAdapter
    settings = ImageServeSettings()


ImageClassifier, ImageModel = serve(ImageClassifier)
