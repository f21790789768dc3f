"""int8 weight-only LLM (``--llm-quant int8``) against the same LLM in bf16 (issue 22): error of
the first-token logits, greedy agreement over 64 tokens, and decode tokens/s on HF's decode path
and on the lean one (the one a Llama-family int8 LLM takes by default). Every model
is the same smol preset (real SmolLM2-135M-Instruct; vision and fusion random, seeded) in bf16;
only the LLM's linear layers differ. Timings are the best of --repeats warm runs in this process.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_int8.py --out bench/results/<machine>/int8.json

``--matvec`` measures the kernels alone instead: per weight matrix of Llama-2-7B and of smol,
one decode row through ``fusedvlm::linear`` with int8 (+ fp32 scales), bf16 and fp32
weights (time, GB/s of weight read, int8 speed over bf16), torch's ``_weight_int8pack_mm`` and
bf16 ``F.linear`` beside them; then, for 1..64 rows of x, our int8 kernel against torch's int8
ops (where Int8Linear switches, ``KERNEL_MAX_ROWS``):

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_int8.py --matvec --out bench/results/<machine>/int8_matvec_1t.json

``--checkpoint DIR`` compares the LLM of a converted checkpoint alone, bf16 against int8, on a
text prompt, in --repeats rounds that alternate the two (the paper-size random checkpoint: about
14 GB of bf16 weights, memory-mapped, and 6.7 GB of int8 ones, both held at once):

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_int8.py --checkpoint <dir> --out bench/results/<machine>/int8_paper.json
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F


def paper_layer_timing(repeats: int) -> dict:
    """One decode token through the seven linear layers of a Llama-2-7B block, bf16 weights vs
    int8 (the same Int8Linear the LLM gets), best of ``repeats`` after a warm-up."""
    from fusedvlm.benchmark.system import time_fn
    from fusedvlm.quant import Int8Linear

    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    gen = torch.Generator().manual_seed(0)
    layers = []
    for out_f, in_f in shapes:
        lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.02)
        layers.append((lin, Int8Linear(lin)))
    x = {n: torch.randn(1, n, generator=gen).bfloat16() for n in (4096, 11008)}

    def timed(pick) -> float:
        def token():
            for pair in layers:
                pick(pair)(x[pair[0].in_features])

        with torch.no_grad():
            return time_fn(token, warmup=1, repeats=repeats).min_ms / 1e3

    bf16_s, int8_s = timed(lambda p: p[0]), timed(lambda p: p[1])
    n = sum(o * i for o, i in shapes)
    return {
        "bf16_ms": bf16_s * 1e3,
        "int8_ms": int8_s * 1e3,
        "bf16_gb_s": 2 * n / bf16_s / 1e9,
        "int8_gb_s": n / int8_s / 1e9,
    }


# (name, [(out, in) of each weight of one kernel call]): one matrix per call, as the issue asks,
# and the calls of one smol decoder layer as the lean engine makes them (q,k,v; o; gate,up; down).
LLAMA7B = [(f"7B {n}x{k}", [(n, k)]) for n, k in ((4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096))]
SMOL = [(f"smol {n}x{k}", [(n, k)]) for n, k in ((576, 576), (192, 576), (1536, 576), (576, 1536))] + [
    ("smol q,k,v", [(576, 576), (192, 576), (192, 576)]),
    ("smol gate,up", [(1536, 576), (1536, 576)]),
]


# One smol decode step's linear layers (30 decoder layers, the calls the lean engine makes per
# layer), each weight a distinct tensor: 106 MB in int8, 212 MB in bf16, so unlike the single
# smol matrices above (a few MB, served from the 32 MB L3 however the calls interleave) they
# stream from memory, as a real decode step does.
SMOL_LAYERS, SMOL_CALLS = 30, [[(576, 576), (192, 576), (192, 576)], [(576, 576)], [(1536, 576)] * 2, [(576, 1536)]]


def _stack_fns(mod, gen) -> tuple[dict, dict]:
    """Every linear call of one smol decode step (LM head aside, tied and kept float by
    quantize_llm) for one row of x, each way, and the weight bytes each way reads."""
    from fusedvlm.quant import quantize_weight

    calls = {"int8": [], "bf16": [], "fp32": []}
    for _ in range(SMOL_LAYERS):
        for shapes in SMOL_CALLS:
            ws = [torch.randn(n, k, generator=gen) * 0.02 for n, k in shapes]
            x32 = torch.randn(1, shapes[0][1], generator=gen)
            qs = [quantize_weight(w) for w in ws]
            none = [None] * len(ws)
            calls["int8"].append((x32.bfloat16(), [q for q, _ in qs], none, [s for _, s in qs]))
            calls["bf16"].append((x32.bfloat16(), [w.bfloat16() for w in ws], none))
            calls["fp32"].append((x32, ws, none))

    def step(key):
        return lambda: [mod.linear(*args) for args in calls[key]]

    elems = SMOL_LAYERS * sum(n * k for shapes in SMOL_CALLS for n, k in shapes)
    rows = SMOL_LAYERS * sum(n for shapes in SMOL_CALLS for n, _ in shapes)
    return {key: step(key) for key in calls}, {"int8": elems + 4 * rows, "bf16": 2 * elems, "fp32": 4 * elems}


def _best_interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best wall time and best process CPU time of each function over ``repeats`` rounds after
    one warm-up round. The rounds interleave the functions, so each finds the cache as the others
    left it (a matrix that fits in L3 is not served from there by its own previous call) and every
    side gets the same repeats. On a shared machine the CPU time leaves out the time other
    processes held the cores (with one thread it is the kernel's own time; with two it adds the
    spin of a thread waiting at the barrier)."""
    import time

    wall, cpu = dict.fromkeys(fns, float("inf")), dict.fromkeys(fns, float("inf"))
    for rnd in range(repeats + 1):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rnd:
                wall[name], cpu[name] = min(wall[name], dt), min(cpu[name], dc)
    return wall, cpu


def _matrix_row(name: str, shapes, wall: dict, cpu: dict, nbytes: dict) -> dict:
    row = {"name": name, "shapes": shapes}
    for key, t in wall.items():
        row[f"{key}_us"] = t * 1e6
        row[f"{key}_cpu_us"] = cpu[key] * 1e6
        row[f"{key}_gb_s"] = nbytes[key] / t / 1e9
    row["int8_speedup_over_bf16"] = wall["bf16"] / wall["int8"]
    row["int8_speedup_over_bf16_cpu_time"] = cpu["bf16"] / max(cpu["int8"], 1e-9)
    return row


def _matrix_fns(mod, ws: list[torch.Tensor], gen) -> tuple[dict, dict]:
    """One decode row through the weights ``ws`` (one kernel call) each way, and the weight
    bytes each way reads."""
    from fusedvlm.quant import quantize_weight

    qs = [quantize_weight(w) for w in ws]
    bf = [w.bfloat16() for w in ws]
    s_bf = [s.bfloat16() for _, s in qs]
    none = [None] * len(ws)
    x32 = torch.randn(1, ws[0].shape[1], generator=gen)
    xbf = x32.bfloat16()
    fns = {
        "int8": lambda: mod.linear(xbf, [q for q, _ in qs], none, [s for _, s in qs]),
        "bf16": lambda: mod.linear(xbf, bf, none),
        "fp32": lambda: mod.linear(x32, ws, none),
        "torch_int8pack_mm": lambda: [torch.ops.aten._weight_int8pack_mm(xbf, q, s) for (q, _), s in zip(qs, s_bf)],
        "torch_bf16_linear": lambda: [F.linear(xbf, w) for w in bf],
    }
    elems, rows = sum(w.numel() for w in ws), sum(w.shape[0] for w in ws)
    nbytes = {"int8": elems + 4 * rows, "bf16": 2 * elems, "fp32": 4 * elems}
    nbytes["torch_int8pack_mm"], nbytes["torch_bf16_linear"] = nbytes["int8"], nbytes["bf16"]
    return fns, nbytes


def _rows_fns(q: torch.Tensor, s: torch.Tensor, x32: torch.Tensor) -> dict:
    """int8 weight (q, s) times ``x32``'s rows: ours and torch's, bf16 and fp32 activations."""
    from fusedvlm.quant import int8_linear

    xbf, s_bf = x32.bfloat16(), s.bfloat16()
    return {
        "ours_bf16_x": lambda: int8_linear(xbf, [(q, s)], [None]),
        "torch_int8pack_mm_bf16_x": lambda: torch.ops.aten._weight_int8pack_mm(xbf, q, s_bf),
        "ours_fp32_x": lambda: int8_linear(x32, [(q, s)], [None]),
        "torch_dequant_fp32_x": lambda: F.linear(x32, q.float()) * s,
    }


@torch.no_grad()
def matvec_timing(repeats: int, rows_list: list[int]) -> dict:
    """Per-call time and weight GB/s of one decode row through our kernel (int8, bf16, fp32) and
    torch's (``_weight_int8pack_mm``, bf16 ``F.linear``); then int8 by rows of x, ours vs torch."""
    from fusedvlm import native
    from fusedvlm.quant import quantize_weight

    mod = native.load()
    gen = torch.Generator().manual_seed(0)
    per_matrix = []
    for name, shapes in LLAMA7B + SMOL:
        fns, nbytes = _matrix_fns(mod, [torch.randn(n, k, generator=gen) * 0.02 for n, k in shapes], gen)
        wall, cpu = _best_interleaved(fns, repeats)
        per_matrix.append(_matrix_row(name, shapes, wall, cpu, nbytes))
    fns, nbytes = _stack_fns(mod, gen)
    per_matrix.append(_matrix_row(f"smol {SMOL_LAYERS} layers", SMOL_CALLS, *_best_interleaved(fns, repeats), nbytes))
    del fns

    by_rows = []
    for name, shapes in [LLAMA7B[0], SMOL[2]]:
        ((n, k),) = shapes
        q, s = quantize_weight(torch.randn(n, k, generator=gen) * 0.02)
        for rows in rows_list:
            best, _ = _best_interleaved(_rows_fns(q, s, torch.randn(rows, k, generator=gen)), max(3, repeats // 4))
            by_rows.append({"name": name, "rows": rows, **{f"{key}_us": t * 1e6 for key, t in best.items()}})
    return {"per_matrix": per_matrix, "by_rows": by_rows}


def _report(res: dict, lines: list[str], out: str | None) -> int:
    """Print the summary lines; with ``out``, the results as JSON there and the lines beside it."""
    from fusedvlm.benchmark.system import save_json

    print("\n".join(lines))
    res["summary"] = lines
    if out:
        save_json(out, res)
        with open(out.removesuffix(".json") + ".txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


def matvec_main(args) -> int:
    import os
    import shlex

    from fusedvlm import native
    from fusedvlm.benchmark.system import environment

    load_before = open("/proc/loadavg").read().split()[:3]
    res = matvec_timing(args.repeats, args.rows)
    load_after = open("/proc/loadavg").read().split()[:3]
    res.update(
        environment=environment(torch.device("cpu")),
        isa=native.isa(),
        threads=torch.get_num_threads(),
        repeats=args.repeats,
        loadavg_before=load_before,
        loadavg_after=load_after,
        command=f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/bench_int8.py "
        + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    lines = [
        f"fusedvlm::linear, one row of x (bf16 x for int8/bf16, fp32 x for fp32), ISA variant {res['isa']}, "
        f"{res['threads']} threads, best of {args.repeats} interleaved rounds; load average "
        f"{' '.join(load_before)} before, {' '.join(load_after)} after",
        f"{'matrix':<18} {'int8 us':>9} {'GB/s':>6} {'bf16 us':>9} {'GB/s':>6} {'fp32 us':>9} {'GB/s':>6} "
        f"{'int8/bf16':>9} {'(CPU time)':>10} {'int8pack_mm us':>14} {'F.linear bf16 us':>16}",
    ]
    for r in res["per_matrix"]:
        lines.append(
            f"{r['name']:<18} {r['int8_us']:9.0f} {r['int8_gb_s']:6.1f} {r['bf16_us']:9.0f} {r['bf16_gb_s']:6.1f} "
            f"{r['fp32_us']:9.0f} {r['fp32_gb_s']:6.1f} {r['int8_speedup_over_bf16']:8.2f}x "
            f"{r['int8_speedup_over_bf16_cpu_time']:9.2f}x "
            f"{r.get('torch_int8pack_mm_us', float('nan')):14.0f} {r.get('torch_bf16_linear_us', float('nan')):16.0f}"
        )
    lines.append(
        "int8 weights by rows of x, us: ours vs torch (bf16 x: _weight_int8pack_mm; fp32 x: dequantise + F.linear)"
    )
    for r in res["by_rows"]:
        lines.append(
            f"{r['name']:<18} rows {r['rows']:3d}: bf16 x ours {r['ours_bf16_x_us']:9.0f} torch "
            f"{r['torch_int8pack_mm_bf16_x_us']:9.0f} ({r['torch_int8pack_mm_bf16_x_us'] / r['ours_bf16_x_us']:.2f}x); "
            f"fp32 x ours {r['ours_fp32_x_us']:9.0f} torch {r['torch_dequant_fp32_x_us']:9.0f} "
            f"({r['torch_dequant_fp32_x_us'] / r['ours_fp32_x_us']:.2f}x)"
        )
    return _report(res, [res["command"], *lines], args.out)


TEXT_PROMPT = "What is the capital of France? Explain its history briefly."


@torch.no_grad()
def text_only(llm32, tokenizer, new_tokens: int) -> dict:
    """The LLM alone on a chat-templated text prompt: bf16, and int8 with bf16 and with fp32
    activations, against fp32 (greedy, HF generate)."""
    from fusedvlm.quant import quantize_llm

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": TEXT_PROMPT}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    bf16 = copy.deepcopy(llm32).to(torch.bfloat16)
    variants = {
        "bf16": bf16,
        "int8 (bf16 activations)": quantize_llm(copy.deepcopy(bf16), "int8"),
        "int8 (fp32 activations)": quantize_llm(copy.deepcopy(llm32), "int8"),
    }

    def run(m):
        out = m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return out[0, ids.shape[1] :].tolist(), m(ids).logits[0, -1].float()

    ref_ids, ref_logits = run(llm32)
    res = {}
    for name, m in variants.items():
        got, logits = run(m)
        same = [a == b for a, b in zip(ref_ids, got)]
        res[name] = {
            "relative_l2_error": float((logits - ref_logits).norm() / ref_logits.norm()),
            "greedy_identical_prefix": same.index(False) if False in same else len(same),
            "text": tokenizer.decode(got),
        }
    res["fp32_text"] = tokenizer.decode(ref_ids)
    return res


def _agreement(ref_logits, ref_ids, logits, ids) -> dict:
    """First-token logits error and greedy agreement of a run against its reference run."""
    top2 = ref_logits.topk(2).values
    same = [i == j for i, j in zip(ref_ids, ids)]
    return {
        "relative_l2_error": float((ref_logits - logits).norm() / ref_logits.norm()),
        "max_abs_error": float((ref_logits - logits).abs().max()),
        "top1_equal": bool(ref_logits.argmax() == logits.argmax()),
        "reference_top2_margin": float(top2[0] - top2[1]),
        "greedy_tokens": len(same),
        "greedy_identical_prefix": same.index(False) if False in same else len(same),
        "greedy_positions_equal": sum(same),
    }


def _sharing_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's tensors: replacing
    a submodule of the copy (quantize_llm does) leaves the original as it was, at no weight memory."""
    twin = copy.copy(module)
    twin._modules = {k: None if m is None else _sharing_copy(m) for k, m in module._modules.items()}
    return twin


def step_weight_bytes(llm) -> int:
    """Bytes of the weights and buffers one decode step of a HF causal LM reads: all of them
    (tied ones once), but of an input embedding table that is not also the LM head only a row."""
    from fusedvlm.benchmark.system import unique_parameter_bytes

    emb = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings()
    tensors = [*head.parameters(), *head.buffers()]
    tied = any(t.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr() for t in tensors)
    return unique_parameter_bytes(llm) - (0 if tied else (emb.shape[0] - 1) * emb[0].numel() * emb.element_size())


@torch.no_grad()
def checkpoint_main(args) -> int:
    """The LLM of a converted checkpoint (e.g. the paper-size random one of bench_real_size.py)
    on a chat-templated text prompt, bf16 against int8, both on the lean decode path: the
    first-token logits, greedy ids over --new-tokens, and decode tokens/s in --repeats rounds
    that alternate bf16 and int8, so that a machine whose speed drifts biases neither. The int8
    LLM is a copy of the module tree that shares the bf16 weights and swaps in int8 projections
    (6.7 GB beside the 13.5 GB of memory-mapped bf16 for the paper's LLM, no second bf16 copy).
    Each timed run reports its major page faults: the bf16 weights are file-backed, and a run
    that had to read them back from disk would be slower for that reason alone."""
    import os
    import resource
    import shlex
    import statistics
    import time

    from fusedvlm import native
    from fusedvlm.benchmark.decode import prompt_embeds
    from fusedvlm.benchmark.system import environment, kv_bytes_per_position, memory_bandwidth
    from fusedvlm.decode import make_engine
    from fusedvlm.generation import GenerationConfig, decode, prefill
    from fusedvlm.model import FusedVLM
    from fusedvlm.quant import Int8Linear, quantize_llm

    t0 = time.perf_counter()
    model = FusedVLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    llm = model.llm
    embeds = prompt_embeds(llm, model.layout, TEXT_PROMPT)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)

    def run(m, path: str = "lean"):
        engine = make_engine(m, path, compile=False)
        state = prefill(engine, embeds)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        out = decode(engine, state, gen, eos_ids=set())
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
        tps = len(out.token_latencies_s) / sum(out.token_latencies_s)
        return state.logits.float(), out.ids, tps, faults, out.path

    parameters = sum(p.numel() for p in llm.parameters())
    ref_logits, ref_ids, _, _, lean_path = run(llm)
    # The same bf16 weights summed in another order (HF's path): how far rounding alone moves
    # this model, the scale for the int8 figures (an fp32 copy of a 7B LLM does not fit here).
    hf_logits, hf_ids, *_ = run(llm, "hf")
    t0 = time.perf_counter()
    int8 = quantize_llm(_sharing_copy(llm), "int8")
    quant_s = time.perf_counter() - t0
    if any(isinstance(m, Int8Linear) for m in llm.modules()):
        raise RuntimeError("quantizing the copy changed the bf16 LLM: the rounds would time int8 twice")
    logits, ids, *_ = run(int8)
    # Bytes a decode step reads: each model's weights and buffers (one row of an untied input
    # embedding table), and the cache at the mean position of the timed tokens.
    kv = kv_bytes_per_position(llm, torch.bfloat16) * (embeds.shape[0] + args.new_tokens / 2)
    step_bytes = {"bf16": step_weight_bytes(llm) + kv, "int8": step_weight_bytes(int8) + kv}
    rounds = []
    for _ in range(args.repeats):
        rnd = {}
        for name, m in (("bf16", llm), ("int8", int8)):
            # Read just before each run: the machine's bandwidth drifts between runs.
            bandwidth, _ = memory_bandwidth(torch.device("cpu"))
            _, _, tps, faults, _ = run(m)
            rnd[name] = {
                "tokens_per_s": tps,
                "major_page_faults": faults,
                "bandwidth_bytes_per_s": bandwidth,
                "bandwidth_fraction": tps * step_bytes[name] / bandwidth,
            }
        rounds.append(rnd)
    median = {k: statistics.median(r[k]["tokens_per_s"] for r in rounds) for k in ("bf16", "int8")}
    fraction = {k: statistics.median(r[k]["bandwidth_fraction"] for r in rounds) for k in ("bf16", "int8")}
    per_round = [r["int8"]["tokens_per_s"] / r["bf16"]["tokens_per_s"] for r in rounds]
    res = {
        "environment": environment(torch.device("cpu")),
        "isa": native.isa() if native.available() else None,
        "threads": torch.get_num_threads(),
        "checkpoint": str(args.checkpoint),
        "llm_parameters": parameters,
        "prompt_tokens": embeds.shape[0],
        "load_s": load_s,
        "quantize_s": quant_s,
        "int8_vs_bf16": _agreement(ref_logits, ref_ids, logits, ids),
        "bf16_hf_vs_bf16": _agreement(ref_logits, ref_ids, hf_logits, hf_ids),
        "rounds": rounds,
        "decode_path": lean_path,
        "decode_tokens_per_s": {"bf16": median["bf16"], "int8": median["int8"]},
        "step_bytes": step_bytes,
        "bandwidth_fraction": fraction,
        # The rounds pair the two: the ratio is the median of each round's own (as paired_ratio).
        "int8_over_bf16": statistics.median(per_round),
        "int8_over_bf16_per_round": per_round,
        "int8_over_bf16_of_medians": median["int8"] / median["bf16"],
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/bench_int8.py "
        + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    lines = [
        res["command"],
        f"LLM of {args.checkpoint} ({res['llm_parameters'] / 1e9:.2f} B parameters), text prompt of "
        f"{res['prompt_tokens']} tokens, lean path, ISA variant {res['isa']}, {res['threads']} threads",
    ]
    for name, key in (
        ("int8 vs bf16", "int8_vs_bf16"),
        ("bf16 HF path vs bf16 lean (rounding alone)", "bf16_hf_vs_bf16"),
    ):
        c = res[key]
        lines.append(
            f"{name}: first-token logits relative L2 {c['relative_l2_error']:.4f}, max abs {c['max_abs_error']:.3f}, "
            f"top-1 {'equal' if c['top1_equal'] else 'different'} (bf16 top-2 margin {c['reference_top2_margin']:.3f}); "
            f"greedy over {c['greedy_tokens']} tokens: identical for the first {c['greedy_identical_prefix']}, "
            f"{c['greedy_positions_equal']} positions equal"
        )
    for i, r in enumerate(rounds):
        lines.append(
            f"round {i + 1}: bf16 {r['bf16']['tokens_per_s']:.2f} tok/s ({r['bf16']['major_page_faults']} major faults), "
            f"int8 {r['int8']['tokens_per_s']:.2f} tok/s ({r['int8']['major_page_faults']} major faults): "
            f"{res['int8_over_bf16_per_round'][i]:.2f}x; bandwidth read before each "
            f"{r['bf16']['bandwidth_bytes_per_s'] / 1e9:.1f} / {r['int8']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s"
        )
    lines.append(
        f"decode, median of {len(rounds)} alternating rounds: bf16 {median['bf16']:.2f} tok/s, int8 "
        f"{median['int8']:.2f} tok/s; int8 over bf16, median of the rounds' ratios {res['int8_over_bf16']:.2f}x "
        f"(of the medians {res['int8_over_bf16_of_medians']:.2f}x), decode path {lean_path}"
    )
    lines.append(
        f"bytes per token bf16 {step_bytes['bf16'] / 1e9:.2f} GB, int8 {step_bytes['int8'] / 1e9:.2f} GB; "
        f"fraction of the read bandwidth (median of the rounds): bf16 {fraction['bf16']:.2f}, "
        f"int8 {fraction['int8']:.2f}"
    )
    return _report(res, lines, args.out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smol")
    p.add_argument("--image", default="sample:grace_hopper")
    p.add_argument("--question", default="Describe the image in detail.")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--matvec", action="store_true", help="the kernels alone, per weight matrix (see above)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256, 1024], help="rows of x, --matvec")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a converted checkpoint: its LLM alone, bf16 vs int8 on a text prompt (see checkpoint_main)",
    )
    args = p.parse_args(argv)
    if args.matvec:
        return matvec_main(args)
    if args.checkpoint:
        return checkpoint_main(args)

    from fusedvlm.benchmark.system import environment
    from fusedvlm.commands import open_image
    from fusedvlm.generation import GenerationConfig
    from fusedvlm.model import FusedVLM
    from fusedvlm.quant import quantize_llm
    from fusedvlm.session import ChatSession

    torch.manual_seed(0)
    fp32 = FusedVLM.from_preset(args.preset).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    int8 = copy.deepcopy(bf16)
    quantize_llm(int8.llm, "int8")
    image = open_image(args.image)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)

    def run(model, decode: str):
        best, ans = 0.0, None
        for _ in range(args.repeats):
            ans = ChatSession(model, image, decode=decode, compile=False).ask(args.question, gen)
            best = max(best, ans.decode_tokens_per_s)
        return ans, best

    full = ChatSession(fp32, image, decode="hf", compile=False).ask(args.question, gen)
    ref, ref_hf = run(bf16, "hf")
    q, q_hf = run(int8, "hf")
    lean, ref_lean = run(bf16, "lean")
    _, q_lean = run(int8, "lean")

    def compare(x, y) -> dict:
        return _agreement(x.first_logits.float(), x.ids, y.first_logits.float(), y.ids)

    text = text_only(fp32.llm, bf16.tokenizer, args.new_tokens)
    layer = paper_layer_timing(args.repeats)
    res = {
        "environment": environment(torch.device("cpu")),
        "preset": args.preset,
        "threads": torch.get_num_threads(),
        "int8_vs_bf16": compare(ref, q),
        "bf16_vs_fp32": compare(full, ref),  # the rounding bf16 itself brings, for scale
        "answers": {"fp32": full.text, "bf16": ref.text, "int8": q.text},
        "decode_tokens_per_s": {
            "bf16_hf": ref_hf,
            "int8_hf": q_hf,
            "bf16_lean": ref_lean,
            "int8_lean": q_lean,
        },
        "lean_path": lean.decode_path,
        "speedup_int8_over_bf16_hf": q_hf / ref_hf,
        "speedup_int8_over_bf16_lean": q_lean / ref_lean,
    }
    res["paper_layer"] = layer
    res["text_only_vs_fp32"] = text
    lines = []
    for name, c in (("int8 vs bf16", res["int8_vs_bf16"]), ("bf16 vs fp32", res["bf16_vs_fp32"])):
        lines.append(
            f"{args.preset} {name}: first-token logits relative L2 {c['relative_l2_error']:.4f}, max abs "
            f"{c['max_abs_error']:.3f}, top-1 {'equal' if c['top1_equal'] else 'different'} (reference top-2 margin "
            f"{c['reference_top2_margin']:.3f}); greedy over {c['greedy_tokens']} tokens: identical for the first "
            f"{c['greedy_identical_prefix']}, {c['greedy_positions_equal']} positions equal"
        )
    for name, t in text.items():
        if name == "fp32_text":
            continue
        lines.append(
            f"LLM alone, text prompt, {name} vs fp32: last-position logits relative L2 {t['relative_l2_error']:.4f}; "
            f"greedy identical for the first {t['greedy_identical_prefix']} of {args.new_tokens}"
        )
    lines.append(
        f"{args.preset} decode tok/s ({res['threads']} threads, best of {args.repeats}): bf16 hf {ref_hf:.1f}, "
        f"int8 hf {q_hf:.1f} ({q_hf / ref_hf:.2f}x); bf16 {lean.decode_path} {ref_lean:.1f}, int8 {q_lean:.1f} "
        f"({q_lean / ref_lean:.2f}x)"
    )
    lines.append(
        f"Llama-2-7B decoder layer, one token (q,k,v,o 4096x4096, gate/up/down 4096x11008): bf16 F.linear "
        f"{layer['bf16_ms']:.1f} ms ({layer['bf16_gb_s']:.1f} GB/s), int8 {layer['int8_ms']:.1f} ms "
        f"({layer['int8_gb_s']:.1f} GB/s): {layer['bf16_ms'] / layer['int8_ms']:.2f}x"
    )
    return _report(res, lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
