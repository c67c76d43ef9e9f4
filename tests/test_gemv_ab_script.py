"""scripts/gemv_ab.py's pure parts (its timing needs CUDA and the kernels library): the settings it parses and the
environment it sets for one session and restores after."""

import importlib.util
import os
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("gemv_ab", Path(__file__).parent.parent / "scripts" / "gemv_ab.py")
gemv_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gemv_ab)


def test_settings_parse_into_names_and_environments():
    got = gemv_ab.parse_settings("base=; pdl=ONNXQF_PDL=1 ;c1=ONNXQF_GEMV_CONFIG=1,ONNXQF_PDL=0;")
    assert got == [("base", {}), ("pdl", {"ONNXQF_PDL": "1"}),
                   ("c1", {"ONNXQF_GEMV_CONFIG": "1", "ONNXQF_PDL": "0"})]


@pytest.mark.parametrize("bad", ["", ";", "=ONNXQF_PDL=1", "fp16=", "a=ONNXQF_PDL", "a=;a=ONNXQF_PDL=1"])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        gemv_ab.parse_settings(bad)


def test_environment_is_restored(monkeypatch):
    monkeypatch.setenv("ONNXQF_PDL", "0")
    monkeypatch.delenv("ONNXQF_GEMV_CONFIG", raising=False)
    with gemv_ab.environ({"ONNXQF_PDL": "1", "ONNXQF_GEMV_CONFIG": "3"}):
        assert os.environ["ONNXQF_PDL"] == "1" and os.environ["ONNXQF_GEMV_CONFIG"] == "3"
    assert os.environ["ONNXQF_PDL"] == "0"
    assert "ONNXQF_GEMV_CONFIG" not in os.environ


@pytest.mark.parametrize("demangled,short", [
    ("void onnxqf::(anonymous namespace)::quantize_rows_regs_kernel<0>(__half const*, signed char*, long)",
     "quantize_rows_regs_kernel"),
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int, int, int>, "
     "cutlass::gemm::KernelTmaWarpSpecializedPingpong, cute::MMA_Atom<cute::SM90::GMMA::MMA_64x128x32_S32S8S8_SS_TN>"
     ">>(cutlass::gemm::kernel::GemmUniversal::Params)", "cutlass Pingpong S32S8S8"),
    ("void cutlass::device_kernel<Foo<cutlass::gemm::StreamKScheduler, KernelTmaWarpSpecializedCooperative>>(P)",
     "cutlass StreamK"),
    ("Memset (Device)", "Memset"),
    ("_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIN4cute5tupleIJiiiiEEENS1_10collective13CollectiveMmaI"
     "NS1_42MainloopSm90TmaGmmaWarpSpecializedCooperativeILi4ENS5_IJLi1ELi2ELi1EEEENS1_"
     "35KernelTmaWarpSpecializedCooperativeEEENS4_8MMA_AtomIJNS4_4SM904GMMA21MMA_64x128x32_S32S8S8_SS_TNEEEE",
     "cutlass Cooperative S32S8S8"),
])
def test_kernel_names_are_short(demangled, short):
    assert gemv_ab.kernel_name(demangled) == short


def test_write_rows_replaces_the_file_whole(tmp_path):
    import argparse
    import json

    out = tmp_path / "ab.json"
    out.write_text("old")
    args = argparse.Namespace(out=str(out), copies=8, repeats=6, rounds=3)
    gemv_ab.write_rows(args, [("rule", {})], [{"M": 528}])
    gemv_ab.write_rows(args, [("rule", {})], [{"M": 528}, {"M": 2048}])
    data = json.loads(out.read_text())
    assert [r["M"] for r in data["rows"]] == [528, 2048] and data["copies"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ab.json"]
