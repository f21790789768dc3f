"""The one place that knows how the supported transformers versions name the KV cache.

transformers 5.x calls it ``cache`` (forward keyword and output field) and warns on
``past_key_values``, which is the only name 4.x knows. Every call into a Hugging Face model that
passes or reads a cache goes through these two functions, so a run prints no deprecation warning
on either line.
"""

import functools
import inspect


@functools.cache
def _forward_takes_cache(forward_type: type) -> bool:
    return "cache" in inspect.signature(forward_type.forward).parameters


def cache_kwarg(model) -> str:
    """The keyword ``model.forward`` takes its KV cache under."""
    return "cache" if _forward_takes_cache(type(model)) else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned (``None`` when it returned none)."""
    if "cache" in output:
        return output["cache"]
    return output.get("past_key_values")
