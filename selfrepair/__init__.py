from .loading import load_model
from .probe import probe, Backend
