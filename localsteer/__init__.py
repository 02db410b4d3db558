"""localsteer: steer local GGUF models with control vectors, through llama.cpp."""

__version__ = "0.1.0"

# llama.cpp's libraries load before anything else does, numpy included: in one Python
# environment (a PyTorch venv's numpy 2.5.2, with a CUDA 13 build of llama.cpp) loading numpy
# first made every model load segfault in the tokenizer's std::regex (docs/benchmarks.md, "On a GPU").
# A missing or broken llama-cpp-python is reported where it is used (`localsteer doctor`).
try:
    import llama_cpp  # noqa: F401
except (ImportError, OSError):
    pass
