"""localsteer: steer local GGUF models with control vectors, through llama.cpp."""

__version__ = "0.1.0"
