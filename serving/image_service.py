"""Image classification service: `bentoml serve serving.image_service:ImageClassifier`.

The serving core (serving/service_factory.py) with the image adapter; `ImageModel` is the model
process of the split topology (None in the in-process one).
"""

from servable.config import ImageServeSettings
from serving.adapters.image import ImageAdapter
from serving.service_factory import build

ImageClassifier, ImageModel = build(ImageAdapter, ImageServeSettings())
