"""What a results file records about the machine: the int8 instructions that decide what int8 gains there."""

from __future__ import annotations

from servable.machine import int8_instructions


def test_int8_instructions_are_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile amx_int8\n")
    assert int8_instructions(str(cpuinfo)) == ["avx512_vnni", "amx_int8"]
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")  # AVX2 alone, as on the AMD EPYC runs
    assert int8_instructions(str(cpuinfo)) == []
    assert int8_instructions(str(tmp_path / "missing")) == []
