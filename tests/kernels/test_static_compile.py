"""scripts/check_triton_compile.py: the kernels compile for sm_80 and sm_90 in the configs of
their tables, without spills, within shared memory, on tensor cores where they should.

Runs in a subprocess with TRITON_INTERPRET removed (this process may be interpreting, and triton
fixes that mode at import). The test runs the check CI can afford, ``--heaviest-epilogues
--bn-flag-cover``: the convolution on every path and kind of operand in its two heaviest
epilogues, and each BatchNorm kernel in every dtype and layout with its flags in combinations
that compile each flag on and off, every flag on among them. For the lent GPUs' architecture
(``GPU_ARCH``) under their Triton (``GPU_TRITON``) it compiles each of those, the convolution
with and without the F3 prologue, once, the variants of a kernel and dtype that share a config
table taking its configs in turn, so every config of every table compiles too
(``--configs-in-turn``, 119 compiles, where every variant in every config took about 270);
under another Triton, the first config of each table and the convolution with the prologue
only (``--quick``, about 90: the kernels build under that Triton; the prologue's code is the
plain convolution's plus an ``if PROLOGUE:`` block). For the other architecture, under the lent
GPUs' Triton only, the convolution with the prologue in the first config of each table (its
``mma`` path; the BatchNorm kernels, plain loads, reductions and stores, hold no
architecture-specific code path). With triton's cache cold a convolution compiles in about 1
CPU second and a BatchNorm kernel in 0.3; each architecture's trace takes about 20 s (6 for
``--quick``, which sweeps the first config alone).
``python scripts/check_triton_compile.py`` compiles all nine epilogues with and without the
prologue and every BatchNorm variant, every kernel for both architectures (about 2070
compiles); run it after changing a kernel or a config table.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "check_triton_compile.py")

# (AFFINE, HAS_RESIDUAL, RELU, STATS): the training epilogue (statistics) and the eval one with
# every feature on, the two the check keeps.
EPILOGUES = [(False, False, False, True), (True, True, True, False)]
PROLOGUES = [False, True]  # F3: the previous unit's BN + ReLU applied to the input operand
PATHS = list(itertools.product((False, True), repeat=2))  # (FLAT_K, POINTWISE)
OPERANDS = [("fp16", "tf32"), ("bf16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")]
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


#: The Triton and the architecture of the GPUs this project is lent (H100/H200): under that
#: Triton (CI's leg 1) the check compiles every config of every table for that architecture;
#: under any other (CI's leg 2) the first config of each table, which shows the kernels build
#: there at a fraction of the cost. ``python scripts/check_triton_compile.py`` compiles every
#: variant in every config: run it after changing a kernel or a config table.
GPU_TRITON = "3.6"
GPU_ARCH = 90


def _config_key(meta: dict, num_warps: int, num_stages: int, maxnreg) -> tuple:
    return tuple(sorted(meta.items())), num_warps, num_stages, maxnreg


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from fusedres.kernels import bn, conv
    from fusedres.kernels._launch import arch_configs

    gpu_triton = triton.__version__.startswith(GPU_TRITON + ".")

    def in_turn(arch) -> bool:
        """Every config of every table (--configs-in-turn), else the first (--quick)."""
        return gpu_triton and arch == GPU_ARCH

    def table_configs(table, arch) -> set:
        configs = arch_configs(table, arch)
        return {_config_key(c.kwargs, c.num_warps, c.num_stages, c.maxnreg)
                for c in (configs if in_turn(arch) else configs[:1])}

    def check_configs(groups: dict, label: str) -> None:
        """Each variant compiled in its table's configs, in one where its group has at least as
        many variants as the table configs (else in as many as the turns give it), and the
        group's together in every config the check takes.

        Args:
            groups: {(group, the table's configs): {variant: its compiled configs}}.
            label: what a failure names.
        """
        for (group, want), variants in groups.items():
            turns = -(-max(len(want), len(variants)) // len(variants))
            for variant, configs in variants.items():
                assert configs and configs <= want, f"{label} {group} {variant}: {configs}"
                assert len(configs) <= turns, f"{label} {group} {variant}: {configs}"
            assert set().union(*variants.values()) == want, f"{label} {group}"

    # Outside every config only the convolution with the F3 prologue: its code is the plain
    # one's plus the prologue's (an `if PROLOGUE:` without an else), so it shows both build.
    def checked_prologues(arch) -> list:
        return PROLOGUES if in_turn(arch) else [True]

    def selection(arch) -> list:
        if arch != GPU_ARCH:
            return ["--match", "^conv_fwd .* PROLOGUE "]
        return [] if gpu_triton else ["--match", "^(?!conv_fwd )|^conv_fwd .* PROLOGUE "]

    archs = (80, 90) if gpu_triton else (GPU_ARCH,)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows, met, report = [], [], ""
    for arch in archs:
        rows_path = tmp_path / f"rows_{arch}.json"
        proc = subprocess.run([sys.executable, SCRIPT, "--heaviest-epilogues", "--bn-flag-cover",
                               "--arch", str(arch), "--json", str(rows_path)]
                              + (["--configs-in-turn"] if in_turn(arch) else ["--quick"])
                              + selection(arch),
                              capture_output=True, text=True, env=env, timeout=3600)
        report = proc.stdout[-20000:] + proc.stderr[-5000:]
        assert proc.returncode == 0, report
        found = json.loads(rows_path.read_text())
        rows += found["compiled"]
        met += found["met"]
    conv_rows = [r for r in rows if r["kernel"].endswith(":_conv_fwd_kernel")]
    for arch in archs:
        tensor_cores = {80: "mma", 90: "wgmma"}[arch]
        compiled: dict = {}
        for r in conv_rows:
            if r["arch"] != arch:
                continue
            flags = r["flags"]
            variant = (r["dtype"], flags["DOT_PRECISION"], flags["FLAT_K"], flags["POINTWISE"],
                       flags["PROLOGUE"], flags["AFFINE"], flags["HAS_RESIDUAL"], flags["RELU"],
                       flags["STATS"])
            compiled.setdefault(variant, set()).add(
                _config_key(r["config"], r["num_warps"], r["num_stages"], r["maxnreg"]))
            if flags["DOT_PRECISION"] == "tf32":
                assert r["mma"] == tensor_cores, f"sm_{arch} {r['label']}: {r['mma']}"
        # Every operand kind, path, prologue and kept epilogue, and every config of the table
        # the launcher picks for it (the script groups a dtype's variants by table), and
        # nothing else.
        expected_variants, groups = set(), {}
        for (dtype, precision), (flat_k, pointwise), prologue, epilogue in itertools.product(
                OPERANDS, PATHS, checked_prologues(arch), EPILOGUES):
            variant = (dtype, precision, flat_k, pointwise, prologue, *epilogue)
            expected_variants.add(variant)
            want = table_configs(conv._conv_table(TORCH_DTYPES[dtype], flat_k, precision,
                                                  prologue), arch)
            groups.setdefault((dtype, frozenset(want)), {})[variant] = compiled.get(variant)
        assert set(compiled) == expected_variants
        check_configs(groups, f"sm_{arch} conv")
    # Every BatchNorm kernel for the lent GPUs' architecture, in every dtype and layout it was
    # met in, with each flag compiled both ways it was met and the variant with every flag met
    # on; the variants of a kernel and dtype together in every config of their table.
    bn_tables = {"_bn_act_fwd_kernel": bn.ELEMENTWISE_CONFIGS,
                 "_bn_act_bwd_dz_kernel": bn.ELEMENTWISE_CONFIGS,
                 "_bn_stats_partial_kernel": bn.REDUCE_CONFIGS,
                 "_bn_act_bwd_reduce_kernel": bn.REDUCE_CONFIGS,
                 "_bn_stats_finalize_kernel": bn.FINALIZE_CONFIGS,
                 "_bn_bwd_finalize_kernel": bn.FINALIZE_CONFIGS}

    def bn_group(r) -> tuple:
        """(arch, kernel, dtype, the flags bn_flag_cover keeps whole) of a BatchNorm row."""
        fixed = tuple(sorted((k, v) for k, v in r["flags"].items()
                             if not isinstance(v, bool) or k == "CHANNELS_LAST"))
        return r["arch"], r["kernel"].split(":")[1], r["dtype"], fixed

    def switches(r) -> set:
        return {(k, v) for k, v in r["flags"].items()
                if isinstance(v, bool) and k != "CHANNELS_LAST"}

    bn_compiled: dict = {}
    for r in rows:
        if ":_bn_" in r["kernel"]:
            bn_compiled.setdefault(bn_group(r), {}).setdefault(r["label"], set()).add(
                _config_key(r["config"], r["num_warps"], r["num_stages"], r["maxnreg"]))
    bn_met: dict = {}
    for r in met:
        if ":_bn_" in r["kernel"] and r["arch"] == GPU_ARCH:
            bn_met.setdefault(bn_group(r), []).append(r)
    assert {(arch, name) for arch, name, _, _ in bn_compiled} == {
        (GPU_ARCH, name) for name in bn_tables}, report
    assert set(bn_compiled) == set(bn_met), report
    bn_config_groups: dict = {}
    for group, variants in bn_met.items():
        compiled = bn_compiled[group]
        label = f"sm_{group[0]} {group[1]} {group[2]} {group[3]}"
        compiled_switches = set().union(*(switches(r) for r in variants if r["label"] in compiled))
        assert compiled_switches == set().union(*map(switches, variants)), label
        most_on = max(sum(v for _, v in switches(r)) for r in variants)
        assert any(sum(v for _, v in switches(r)) == most_on and r["label"] in compiled
                   for r in variants), label
        # The script's groups: a kernel's variants of one dtype (both layouts) share a table.
        want = table_configs(bn_tables[group[1]], group[0])
        bn_config_groups.setdefault(((group[1], group[2]), frozenset(want)), {}).update(
            {(group[3], name): configs for name, configs in compiled.items()})
    check_configs(bn_config_groups, f"sm_{GPU_ARCH} bn")
