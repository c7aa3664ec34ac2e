"""The summary of a scripts/gpu_validate.sh run, from its JSON lines (and the targets of
fusedres.report); ``python scripts/gpu_validate.py summary --out DIR`` renders it again.

``main(out)`` writes ``out/README.md`` (every table in full, ready to be committed with
results.jsonl under benchmarks/results/<gpu>/) and prints a shorter version, which the
shell script prints last: it is what a 12,000-character tail of the output shows. The exit
status is the run's verdict on correctness (:func:`verdict`).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Optional

from gpu_validate_common import RESULTS_FILE

#: Failing checks, skips and errors listed on stdout (README.md lists all of them).
SHORT_LIST = 12


def load(out: str) -> list:
    """The records of ``out/results.jsonl``; a line cut off mid-write is dropped."""
    records = []
    path = os.path.join(out, RESULTS_FILE)
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def slug(name: Optional[str]) -> str:
    """A folder name for benchmarks/results/ from a device name: "NVIDIA H200" -> nvidia-h200."""
    return re.sub(r"[^a-z0-9]+", "-", (name or "cpu").lower()).strip("-")


def _table(header: list, rows: list) -> list:
    if not rows:
        return ["(none)"]
    align = ["---"] + ["---:"] * (len(header) - 1)
    return (["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _ms(rec: Optional[dict], speedup: Optional[float] = None) -> str:
    if rec is None:
        return "-"
    cell = f"{rec['median_ms']:.3f}"
    return cell + (f" ({speedup:.2f}x)" if speedup else "")


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def verdict(records: list) -> tuple[int, list, list]:
    """(exit status, reasons it is 1, other problems).

    The status is about correctness: 1 when a check failed or raised, when the build or the
    check stage failed or was cut off (so not every check ran), or when no check ran at all.
    Errors and cut-offs elsewhere (a benchmark that raised, the bench stage's time limit) and
    checks or measurements skipped for the budget are the other problems: listed, not fatal.
    """
    reasons, problems = [], []
    failed = [r for r in records if r["kind"] == "check" and r["status"] != "pass"]
    if failed:
        reasons.append(f"{len(failed)} failed checks")
    errors = [r for r in records if r["kind"] == "error"]
    if any(r["stage"] == "check" for r in errors):
        reasons.append(f"{sum(r['stage'] == 'check' for r in errors)} checks raised")
    if any(r["stage"] != "check" for r in errors):
        problems.append(f"{sum(r['stage'] != 'check' for r in errors)} errors outside the checks")
    for r in records:
        if r["kind"] == "stage" and r["status"] in ("fail", "timeout"):
            (reasons if r["stage"] in ("build", "check") else problems).append(
                f"stage {r['stage']}: {r['status']}")
    if not any(r["kind"] == "check" for r in records):
        reasons.append("no check ran")
    for stage in ("check", "bench"):
        skipped = sum(r["kind"] == "skip" and r["stage"] == stage
                      and r["reason"].startswith("budget") for r in records)
        if skipped:
            problems.append(f"{skipped} {stage} items skipped for the budget")
    return (1 if reasons else 0), reasons, problems


def _machine(records: list) -> list:
    m = next((r for r in records if r["kind"] == "machine"), None)
    if m is None:
        return ["machine: not recorded"]
    device = m.get("gpu") or f"CPU only ({m.get('cpu')})"
    return [f"- device: {device}" + (f", sm {m['sm']}, {m['sms']} SMs, {m['gpu_memory_gib']} GiB, "
                                     f"driver {m.get('driver')}" if m.get("gpu") else ""),
            f"- software: torch {m['torch']} (CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}), "
            f"triton {m.get('triton')}, python {m['python']}, nvcc: {m.get('nvcc')}",
            f"- host: {m['cpu']}, {m['cpu_count']} CPUs, load {m['load_average_1min']:.1f}; "
            f"{m['platform']}",
            f"- C++: {m.get('cxx')} ({m.get('cxx_version')}), default _GLIBCXX_USE_CXX11_ABI "
            f"{m.get('cxx_default_cxx11_abi')} (torch's {m.get('torch_cxx11_abi')}); loaded: "
            f"{', '.join(m.get('cxx_runtimes_loaded') or []) or '-'}"
            if "cxx" in m else "- C++: not recorded (a run before 2eba61c)",
            f"- commit {m.get('commit')}" + (" (tree changed)" if m.get("tree_changed") else "")
            + f", {m['date']}" + (", DRY RUN (CPU, Triton interpreter, tiny shapes: the numbers "
                                  "mean nothing)" if m.get("dry_run") else "")]


def _stages(records: list) -> list:
    rows = [[r["stage"], r["status"], r["seconds"], r["budget_s"], r["estimate_s"],
             r.get("note", "")] for r in records if r["kind"] == "stage"]
    return _table(["stage", "status", "s", "budget s", "estimate s", "note"], rows)


def _checks(records: list, full: bool) -> list:
    counts: dict = defaultdict(lambda: [0, 0, 0.0])
    checks = [r for r in records if r["kind"] == "check"]
    for r in checks:
        key = (r["group"], r["backend"], r.get("dtype", "-"))
        counts[key][0 if r["status"] == "pass" else 1] += 1
        counts[key][2] += r.get("seconds", 0.0)
    rows = [[g, b, d, p, f] for (g, b, d), (p, f, _) in counts.items()]
    lines = _table(["group", "backend", "dtype", "pass", "fail"], rows)
    failed = [r for r in checks if r["status"] != "pass"]
    for r in failed[:None if full else SHORT_LIST]:
        # the rule's message names the tensor
        why = r.get("why") or next((v.get("why", f"{k}: failed")
                                    for k, v in r["tensors"].items() if not v["ok"]), "")
        lines.append(f"- FAIL {r['group']} {r['name']} {r['backend']} {r.get('dtype', '')} "
                     f"{r.get('mode', '')}: {why if full else why[:200]}")
    if len(failed) > SHORT_LIST and not full:
        lines.append(f"- ... {len(failed) - SHORT_LIST} more in README.md")
    return lines


def _timed(records: list, part: str, full: bool) -> list:
    """The block or model table: eager_cl, triton, cuda (main phase) and compile (its phase)."""
    main: dict = defaultdict(dict)
    comp: dict = defaultdict(dict)
    order = []
    for r in records:
        if r["kind"] == "bench" and r["part"] == part:
            (main if r["phase"] == "main" else comp)[r["group"]][r["provider"]] = r
            if r["group"] not in order:
                order.append(r["group"])
    fused = _in_order(r["provider"] for g in main.values() for r in g.values()
                      if r["provider"] != "eager_cl")
    # fused providers timed again beside torch.compile: their ratio to it in that phase
    beside = _in_order(r["provider"] for g in comp.values() for r in g.values()
                       if r["provider"] not in ("eager_cl", "compile"))
    header = ["case", "shape", "eager_cl ms"] + [f"{p} ms (vs eager_cl)" for p in fused] + [
        "compile ms (vs eager_cl)"] + [f"{p} vs compile" for p in beside]
    rows = []
    for group in order:
        m, c = main.get(group, {}), comp.get(group, {})
        any_rec = next(iter(m.values()), None) or next(iter(c.values()))
        row = [group, any_rec.get("shape", f"batch {any_rec['batch']}"), _ms(m.get("eager_cl"))]
        row += [_ms(m.get(p), m[p]["vs_eager_cl"] if p in m else None) for p in fused]
        comp_rec = c.get("compile")
        row.append(_ms(comp_rec, comp_rec and comp_rec["vs_eager_cl"]))
        row += [f"{comp_rec['median_ms'] / c[p]['median_ms']:.2f}x" if comp_rec and p in c
                else "-" for p in beside]
        rows.append(row)
    lines = _table(header, rows)
    if full:
        detail = [[r["group"], r["phase"], r["provider"], f"{r['median_ms']:.3f}",
                   f"{r['q1_ms']:.3f}-{r['q3_ms']:.3f}", f"{r['min_ms']:.3f}-{r['max_ms']:.3f}",
                   f"{r['host_ms']:.3f}", r["first_call_s"], _mib(r.get("peak_mem_bytes")),
                   f"{r['images_per_s']:.0f}"]
                  for r in records if r["kind"] == "bench" and r["part"] == part]
        lines += ["", "Per provider (ms per step over the rounds; host = the CPU's time to issue "
                      "a step; first call = autotuning or compiling included):", ""]
        lines += _table(["case", "phase", "provider", "median", "q1-q3", "min-max", "host",
                         "first call s", "peak memory", "images/s"], detail)
    return lines


def _host_and_memory(records: list, part: str) -> list:
    """Per case, each provider's host time per step and peak memory (main phase)."""
    lines: dict = {}
    for r in records:
        if r["kind"] == "bench" and r["part"] == part and r["phase"] == "main":
            lines.setdefault(r["group"], []).append(
                f"{r['provider']} {r['host_ms']:.2f} ms / {_mib(r.get('peak_mem_bytes'))}")
    return [f"- {group}, host time per step / peak memory: {', '.join(cells)}"
            for group, cells in lines.items()]


def _targets(records: list) -> list:
    """Each fused provider against fusedres.report's targets (measured, not asserted)."""
    from fusedres.report import BOTTLENECK_TARGETS, MEMORY_BOUND_TARGET

    train = [r for r in records if r["kind"] == "bench" and r["part"] == "block"
             and r["mode"] == "train"]
    compiled = {(r["group"], r["provider"]): r["median_ms"] for r in train
                if r["phase"] == "compile"}
    lines = []
    for provider in _in_order(r["provider"] for r in train if r["phase"] == "main"
                              and r["provider"] != "eager_cl"):
        mine = [r for r in train if r["phase"] == "main" and r["provider"] == provider]
        met = sum(r["vs_eager_cl"] >= BOTTLENECK_TARGETS["eager"] for r in mine)
        line = (f"- {provider}: Bottleneck training step >= {BOTTLENECK_TARGETS['eager']}x "
                f"eager_cl in {met} of {len(mine)} blocks")
        vs = [compiled[(r["group"], "compile")] / compiled[(r["group"], provider)]
              for r in mine if (r["group"], "compile") in compiled
              and (r["group"], provider) in compiled]
        if vs:
            met = sum(v >= BOTTLENECK_TARGETS["compile"] for v in vs)
            line += (f"; >= {BOTTLENECK_TARGETS['compile']}x torch.compile in {met} of "
                     f"{len(vs)}")
        bn = [r for r in records if r["kind"] == "kernel" and r["part"] == "bn"
              and r["provider"] == provider and r.get("of_copy") is not None]
        if bn:
            met = sum(r["of_copy"] >= MEMORY_BOUND_TARGET for r in bn)
            line += (f"; BN kernels >= {MEMORY_BOUND_TARGET:.0%} of the copy bandwidth in "
                     f"{met} of {len(bn)}")
        lines.append(line)
    return lines or ["(nothing timed)"]


def _in_order(names) -> list:
    """The distinct ``names`` in the order they first come (the plan's provider order)."""
    return list(dict.fromkeys(names))


def _setting(records: list, part: str) -> str:
    """"Batch 128, bfloat16 autocast, channels_last, 10 rounds: " from the records."""
    r = next((r for r in records if r["kind"] == "bench" and r["part"] == part), None)
    if r is None:
        return ""
    size = f" at {r['image']} px" if "image" in r else ""
    mixed = " autocast" if r["dtype"] != "float32" else ""
    return f"Batch {r['batch']}{size}, {r['dtype']}{mixed}, channels_last, {r['rounds']} rounds: "


def _kernels(records: list) -> list:
    peaks = next((r for r in records if r["kind"] == "peaks"), None)
    lines = []
    if peaks:
        lines.append(f"Peaks: copy {peaks['copy_GBps']:.0f} GB/s (read + write), matmul "
                     f"{peaks['matmul_TFLOPs']:.0f} TFLOP/s ({peaks['how']}).")
        lines.append("")
    bn: dict = defaultdict(dict)
    for r in records:
        if r["kind"] == "kernel" and r["part"] == "bn":
            bn[(r["op"], r["shape"])][r["provider"]] = r
    providers = _in_order(p for v in bn.values() for p in v)
    rows = [[op, shape] + [f"{v[p]['GBps']:.0f}" + (f" ({v[p]['of_copy']:.0%})"
                                                     if v[p].get("of_copy") else "")
                           if p in v else "-" for p in providers]
            for (op, shape), v in bn.items()]
    lines += ["BatchNorm kernels, GB/s of the bytes they must move (% of the copy bandwidth):",
              ""] + _table(["op", "shape"] + providers, rows) + [""]
    conv = [r for r in records if r["kind"] == "kernel" and r["part"] == "conv"]
    rows = [[r["op"], r["shape"], r["provider"], f"{r['median_ms']:.3f}", r["TFLOPs"],
             "-" if r.get("of_matmul") is None else f"{r['of_matmul']:.0%}",
             f"{r['vs_cudnn']:.2f}x"]
            for r in conv]
    lines += ["Convolution alone, TFLOP/s (% of the matmul peak; speed relative to cuDNN):",
              ""] + _table(["unit", "shape", "provider", "ms", "TFLOP/s", "of peak",
                            "vs cudnn"], rows)
    return lines


def _profile(records: list, full: bool) -> list:
    prof = next((r for r in records if r["kind"] == "profile"), None)
    if prof is None:
        return ["(not measured)"]
    lines = [f"One triton training step of {prof['name']} at batch {prof['batch']}"
             + (f": {prof['kernel_launches']} kernel launches, {prof['device_ms']} ms of kernels"
                if prof["kernel_launches"] else "") + f" (sorted by {prof['sort_by']})."]
    if full:
        return lines + ["", "```", prof["table"], "```"]
    return lines + [""] + _table(["op / kernel", "calls", "self ms"],
                                 [[t["name"][:70], t["calls"], t["self_ms"]]
                                  for t in prof["top"][:10]])


def _listed(records: list, kind: str, full: bool) -> list:
    found = [r for r in records if r["kind"] == kind]
    lines = [f"- [{r['stage']}] {r['what']}: {r.get('reason') or r.get('error')}"
             for r in found[:None if full else SHORT_LIST]]
    if len(found) > SHORT_LIST and not full:
        lines.append(f"- ... {len(found) - SHORT_LIST} more in README.md")
    return lines or ["(none)"]


def _warm(records: list) -> list:
    lines = []
    for stage in ("warmup_triton", "warmup_compile"):
        warm = [r for r in records if r["kind"] == "warm" and r["stage"] == stage]
        if warm:
            lines.append(f"- {stage}: {len(warm)} tasks, {sum(r['seconds'] for r in warm):.0f} s "
                         f"of work in parallel processes")
    return lines or ["(none)"]


def render(records: list, full: bool) -> str:
    """The summary as Markdown; ``full`` adds the detail tables and the whole profiler table."""
    code, reasons, problems = verdict(records)
    gpu = next((r.get("gpu") for r in records if r["kind"] == "machine"), None)
    lines = [f"# fusedres GPU validation: {gpu or 'CPU dry run'}", ""] + _machine(records) + [
        "", "Made by `bash scripts/gpu_validate.sh` (results.jsonl holds every record); commit "
            f"this folder as benchmarks/results/{slug(gpu)}/.", "",
        "## Stages", ""] + _stages(records) + [
        "", "## Correctness against eager and a float64 oracle", "",
        "Rule of tests/conftest.py: error against the oracle <= 2x eager's in the same dtype + "
        "atol; units by max error, block gradients and whole networks by relative L2. Triton "
        "ran each kernel's first config (FUSEDRES_TRITON_CONFIG=0: autotuning every case would "
        "not fit the budget); fp32 without TF32 on both sides.", ""
    ] + _checks(records, full) + [
        "", "## ResNet-50 Bottleneck blocks", "",
        _setting(records, "block") + "ms per step, median of the rounds; (x) = eager_cl's "
        "time / the provider's; `+graph`: the step replayed as one CUDA graph; compile was timed "
        "last, beside eager_cl and the fused backends again, and `<backend> vs compile` is "
        "compile's time / the backend's there.", ""
    ] + _timed(records, "block", full) + [
        "", "Targets (fusedres.report; measured, not asserted):", ""] + _targets(records) + [
        "", "## Whole network", "", _setting(records, "model") + "a training step is "
        "forward, cross-entropy, backward and an SGD step.", ""
    ] + _timed(records, "model", full) + [""] + _host_and_memory(records, "model") + [
        "", "## Kernels", ""] + _kernels(records) + [
        "", "## Profile", ""] + _profile(records, full) + [
        "", "## Warm-up", ""] + _warm(records) + [
        "", "## Skipped", ""] + _listed(records, "skip", full) + [
        "", "## Errors", ""] + _listed(records, "error", full) + [
        "", f"**Verdict: {'PASS' if code == 0 else 'FAIL: ' + '; '.join(reasons)}**"
        + (f" (other problems: {'; '.join(problems)})" if problems else "")]
    return "\n".join(lines) + "\n"


def main(out: str) -> int:
    """Writes README.md, prints the short summary; returns the run's exit status."""
    records = load(out)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(render(records, full=True))
    print(render(records, full=False), flush=True)
    return verdict(records)[0]
