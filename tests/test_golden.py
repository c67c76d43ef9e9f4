"""Behaviour kept through the restructure of issue 17: for fixed seeds, every transform and format gives the logits
the code gave before it (tests/golden.py made tests/data/golden_logits.json with the code of 3b80ac8)."""

import json
from pathlib import Path

import numpy as np
import pytest

from golden import POSITIONS, VOCAB, run_case

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_logits.json").read_text())


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_rewrite_gives_the_logits_it_gave_before(case, tmp_path_factory):
    want = GOLDEN[case]
    work = tmp_path_factory.getbasetemp() / "golden"
    # MatMulNBits' accuracy_level as it was (0); --ep cpu now defaults to 4 (int8 compute: issue 18)
    extra = ("--accuracy-level", "0") if {"int4", "int8w"} & set(want["args"]) else ()
    got = run_case(want["model"], want["args"], work, extra)[0, POSITIONS, VOCAB]
    # float rounding: the stored values have 6 decimals; GPTQ and the α search run in float64/float32 numpy
    np.testing.assert_allclose(got, np.array(want["logits"]), rtol=0, atol=1e-4 * want["scale"] + 2e-6)
