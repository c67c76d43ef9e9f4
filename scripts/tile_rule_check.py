"""How the CUDA library's GEMM tile rules do against timed tiles: reads ``scripts/gemv_ab.py`` outputs (a run's
JSON, or a file of several runs under keys, as docs/data/gemm_tiles_*.json) and, for every (run, K, N, M) point, finds
the fastest tile timed there (settings that force one tile, ``ONNXQF_GEMM_TILE=t`` alone) and the tile each rule
picks (``onnxqf.runtime.kernels.gemm_tile``, read from the built library: no GPU needed). Prints a table and the
geometric mean of x FP16 under each rule over the points where every rule's pick was timed::

    python scripts/tile_rule_check.py docs/data/gemm_tiles_h100_g16.json --runs 'tiles_*,rule_t6_*' \\
        --assume 'rule_t6_*:rule=6'

``--assume RUNS:NAME=TILE`` counts a setting that is not a forced tile as that tile in the runs matching RUNS (there,
the library's default rule picked TILE at every point). ``--rules 0,1`` the rules compared (ONNXQF_GEMM_RULE).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
from pathlib import Path


def load_runs(paths: list[str]) -> dict[str, dict]:
    """Each file's runs by name: a gemv_ab output is one run (named by its file), a dict of them is several."""
    runs: dict[str, dict] = {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        if "settings" in data and "rows" in data:
            runs[Path(p).stem] = data
        else:
            runs.update({k: v for k, v in data.items() if isinstance(v, dict) and "rows" in v and "settings" in v})
    if not runs:
        raise SystemExit(f"no gemv_ab runs in {', '.join(paths)}")
    return runs


def setting_tiles(run_name: str, settings: list, assume: list[tuple[str, str, int]]) -> dict[str, int]:
    """The tile each setting forced: ONNXQF_GEMM_TILE alone in its environment, or an --assume for this run."""
    tiles = {}
    for name, env in settings:
        if set(env) == {"ONNXQF_GEMM_TILE"}:
            tiles[name] = int(env["ONNXQF_GEMM_TILE"])
    for pattern, name, tile in assume:
        if fnmatch.fnmatch(run_name, pattern) and any(s[0] == name for s in settings):
            tiles[name] = tile
    return tiles


def points(runs: dict[str, dict], assume, run_filter: list[str] | None) -> list[dict]:
    """One entry per (run, K, N, M): x FP16 of every timed tile (the faster where two settings force the same)."""
    out = []
    for run_name, run in runs.items():
        if run_filter and not any(fnmatch.fnmatch(run_name, f) for f in run_filter):
            continue
        tiles = setting_tiles(run_name, run["settings"], assume)
        for row in run["rows"]:
            speed: dict[int, float] = {}
            for name, tile in tiles.items():
                if name in row["speedup"]:
                    speed[tile] = max(speed.get(tile, 0.0), row["speedup"][name])
            if speed:
                out.append({"run": run_name, "K": row["K"], "N": row["N"], "M": row["M"], "speedup": speed})
    return out


def evaluate(pts: list[dict], picks: dict[int, dict[tuple[int, int], int]]) -> dict:
    """Per rule: its pick and x FP16 at each point (None where its tile was not timed) and the geometric mean over
    the points where every rule's pick was timed; the same mean for the fastest timed tile."""
    rows, common = [], []
    for p in pts:
        best = max(p["speedup"], key=p["speedup"].get)
        by_rule = {r: (picks[r][p["M"], p["N"]], p["speedup"].get(picks[r][p["M"], p["N"]])) for r in picks}
        rows.append({**p, "best": best, "rules": by_rule})
        if all(v is not None for _, v in by_rule.values()):
            common.append(rows[-1])

    def gmean(values):
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")

    means = {r: gmean([row["rules"][r][1] for row in common]) for r in picks}
    means["best"] = gmean([row["speedup"][row["best"]] for row in common])
    return {"rows": rows, "points": len(common), "means": means}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="gemv_ab.py outputs (--out), or files of several runs")
    ap.add_argument("--runs", help="comma-separated patterns of the run names to read (default: all)")
    ap.add_argument("--assume", action="append", default=[], metavar="RUNS:NAME=TILE",
                    help="a setting of those runs counted as that tile (repeatable)")
    ap.add_argument("--rules", default="0,1", help="the rules to compare (ONNXQF_GEMM_RULE values; default 0,1)")
    ap.add_argument("--sm-count", type=int, default=132, help="multiprocessors (132: H100 SXM, H200)")
    ap.add_argument("--library", help="the CUDA library to read the rules from (default: as onnxqf finds it)")
    args = ap.parse_args(argv)

    from onnxqf.errors import OnnxqfError
    from onnxqf.runtime import kernels

    assume = []
    for a in args.assume:
        try:
            pattern, rest = a.rsplit(":", 1)
            name, tile = rest.split("=")
            assume.append((pattern, name, int(tile)))
        except ValueError:
            raise SystemExit(f"--assume {a}: expected RUNS:NAME=TILE, e.g. 'rule_t6_*:rule=6'") from None
    rules = [int(r) for r in args.rules.split(",")]
    pts = points(load_runs(args.files), assume, args.runs.split(",") if args.runs else None)
    if not pts:
        raise SystemExit("no point with a timed tile (settings forcing ONNXQF_GEMM_TILE, or --assume)")
    lib = Path(args.library) if args.library else None
    try:
        picks = {r: {(p["M"], p["N"]): kernels.gemm_tile(p["M"], p["N"], args.sm_count, path=lib, rule=r)
                     for p in pts} for r in rules}
    except OnnxqfError as e:
        raise SystemExit(str(e)) from None
    result = evaluate(pts, picks)

    print("| run | K → N | M | fastest timed | " + " | ".join(f"rule {r}" for r in rules) + " |")
    print("|---|---|---|---|" + "---|" * len(rules))
    for row in result["rows"]:
        best = f"t{row['best']} {row['speedup'][row['best']]:.3f}×"
        cells = []
        for r in rules:
            tile, v = row["rules"][r]
            cells.append(f"t{tile} not timed" if v is None else
                         f"t{tile} {v:.3f}× ({(v / row['speedup'][row['best']] - 1) * 100:+.1f} %)")
        print(f"| {row['run']} | {row['K']} → {row['N']} | {row['M']} | {best} | " + " | ".join(cells) + " |")
    means = result["means"]
    print(f"\ngeometric mean of × FP16 over the {result['points']} points where every rule's tile was timed: "
          + ", ".join(f"rule {r} {means[r]:.3f}" for r in rules) + f", fastest timed {means['best']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
