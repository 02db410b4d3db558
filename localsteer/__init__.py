"""localsteer: steer local GGUF models with control vectors, through llama.cpp.

The public API is `localsteer.api`; every name in its `__all__` is importable from here too:
`from localsteer import load_model, steering_from_specs, generate, ControlVector`.
"""

__version__ = "0.1.0"

# llama.cpp's libraries load before anything else does, numpy included: in one Python
# environment (a PyTorch venv's numpy 2.5.2, with a CUDA 13 build of llama.cpp) loading numpy
# first made every model load segfault in the tokenizer's std::regex (docs/benchmarks.md, "On a GPU").
import llama_cpp  # noqa: E402,F401,I001

from . import api  # noqa: E402
from .api import *  # noqa: E402,F401,F403

__all__ = ["__version__", "api", *api.__all__]
