"""LLM decode engines, all behind one interface (:class:`~fusedvlm.decode.engine.DecodeEngine`),
and the one place that picks one (:func:`make_engine`).

Paths, reported as ``engine.path`` with ``engine.reason``:

* ``lean-fused``: Llama-family config on the CPU (fp32, bf16 or fp16, projections in that dtype
  or int8), the C++ kernels built: each step of up to ``MATVEC_MAX_ROWS`` rows (4; 128 in bf16
  and fp16) is one C++ op (``fusedvlm::llama_decode_step``, csrc/decode_step.inc), nothing
  compiled; larger batches step as ``lean-compiled`` (or ``lean-eager`` without compilation).
  ``FUSEDVLM_FUSED_STEP=0`` turns it off;
* ``lean-compiled``: Llama-family config (Llama-2, Vicuna, SmolLM2): our lean Llama step over
  a static KV cache, compiled once per (batch, cache bucket), gpt-fast style: inductor C++ on a
  CPU, CUDA graphs (``mode="reduce-overhead"``) on a GPU (decode/lean.py);
* ``lean-eager``: the same step uncompiled (``--no-compile``, or torch.compile unavailable);
* ``hf-static-compiled``: any other HF causal LM whose cache can be static (Qwen2/3, Gemma,
  GPT-NeoX, GPT-2, ...): HF's own forward over HF's ``StaticCache``, the one-token forward
  compiled the same way (decode/hf_static.py);
* ``hf-static-eager``: the same uncompiled (``--decode hf-static --no-compile``; ``auto`` takes
  ``hf`` instead: the path is there for its compiled step);
* ``hf``: Hugging Face forward with its DynamicCache (any causal LM, an int8 LLM; also
  ``--decode hf``; decode/hf.py).

Every engine keeps the KV cache in an object with the Hugging Face cache API the chat session
relies on for rollback: ``get_seq_length()`` and ``crop(n)``.
"""

from __future__ import annotations

import os

from fusedvlm.decode.engine import DecodeEngine, compile_default, enable_compile_cache
from fusedvlm.decode.hf import HFEngine
from fusedvlm.decode.hf_static import HFStaticEngine, hf_static_unsupported
from fusedvlm.decode.lean import LeanEngine, lean_unsupported

# The --decode choices: auto, then each engine's name.
DECODE_PATHS = ("auto", LeanEngine.name, HFStaticEngine.name, HFEngine.name)


def make_engine(hf, decode: str = "auto", compile: bool | None = None, fused: bool | None = None) -> DecodeEngine:
    """The decode engine for a HF causal LM: ``decode`` is ``auto`` (lean when the config allows,
    else HF's forward over a static cache when the model supports one and the step compiles,
    else HF), ``lean`` / ``hf-static`` (error when unsupported) or ``hf``; ``compile`` None means
    :func:`compile_default`; ``fused`` None means the lean step's one-op C++ form wherever it can
    run unless ``FUSEDVLM_FUSED_STEP=0``, False never (to compare). ``engine.reason`` says why."""
    from fusedvlm.quant import is_quantized

    if compile is None:
        compile = compile_default()
    if decode not in DECODE_PATHS:
        raise ValueError(f"unknown decode path {decode!r}; choose from {DECODE_PATHS}")
    if decode == "hf":
        return HFEngine(hf, reason="requested (--decode hf)")
    if is_quantized(hf) and (decode == "hf-static" or lean_unsupported(hf.config)):
        # The lean step reads int8 weights with their scales; HF's static-cache step would
        # compile Int8Linear's torch fallbacks. Other int8 LLMs run in HF's forward.
        if decode != "auto":
            raise ValueError(f"--decode {decode}: an int8 LLM (--llm-quant int8) decodes on the lean or hf path only")
        return HFEngine(hf, reason="int8 LLM (--llm-quant int8) outside the lean step's Llama family")
    if compile:
        enable_compile_cache()
    compiler = (
        "" if not compile or _compile_available() else "torch.compile is unavailable here (no C++ compiler / inductor)"
    )
    off = "compilation off (--no-compile or FUSEDVLM_COMPILE=0)"
    why_not = lean_unsupported(hf.config) if decode != "hf-static" else "--decode hf-static"
    if why_not is None:
        from fusedvlm.env import env_flag

        if fused is None:
            fused = env_flag("FUSEDVLM_FUSED_STEP", True)
        engine = LeanEngine(
            hf,
            compile=compile and not compiler,
            fused=fused,
            reason=compiler or "Llama-family config" + ("" if compile else f"; {off}"),
        )
        if engine.fused:
            rows = engine.model.matvec_rows
            engine.reason = "Llama-family config on the CPU: each step one C++ op (csrc/decode_step.inc); " + (
                f"batches over {rows} rows compiled" if engine.compiled else f"batches over {rows} rows eager"
            )
        elif fused and engine.model.embed.device.type == "cpu":
            engine.reason += f"; no fused step: {engine.why_not_fused}"
        return engine
    if decode == "lean":
        raise ValueError(f"--decode lean: {why_not}")
    why_not_static = hf_static_unsupported(hf)
    if decode == "hf-static":
        if why_not_static is not None:
            raise ValueError(f"--decode hf-static: {why_not_static}")
        return HFStaticEngine(
            hf,
            compile=compile and not compiler,
            reason=f"requested (--decode hf-static){'; ' + (compiler or off) if compiler or not compile else ''}",
        )
    if why_not_static is not None:
        return HFEngine(hf, reason=f"lean step unsupported: {why_not}; HF static cache unsupported: {why_not_static}")
    if not compile or compiler:
        # The static path exists for its compiled step: uncompiled, auto keeps the dynamic cache
        # every causal LM had before (``--decode hf-static`` still runs it eagerly).
        return HFEngine(
            hf,
            reason=f"lean step unsupported: {why_not}; the HF static-cache step needs torch.compile: {compiler or off}",
        )
    return HFStaticEngine(
        hf, compile=True, reason=f"lean step unsupported: {why_not}; {type(hf).__name__} supports a static cache"
    )


def _compile_available() -> bool:
    import shutil

    try:
        import torch._inductor
    except ImportError:
        return False
    # Inductor's CPU backend generates C++; without a compiler it fails at the first call.
    return (
        shutil.which(os.environ.get("CXX", "g++")) is not None
        or shutil.which("c++") is not None
        or torch.cuda.is_available()
    )
