"""llavamed: train, evaluate and serve LLaVA-Med style biomedical vision-language assistants."""

__version__ = "0.1.0"
