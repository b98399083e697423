"""Source lines of the GPU kernels in a ``benchmarks/profile.py`` table.

XLA names its fusions (``loop_add_fusion_67``) after nothing in the program. With the optimised
HLO of the same compilation, dumped by XLA next to the profile::

    XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text" \\
        python benchmarks/profile.py --targets train:32768:nsa --top 120 --out PROF
    python benchmarks/profile_sources.py DIR/module_*.jit_train_step.*after_optimizations.txt \\
        PROF/profile.json train:32768:nsa

this prints, for each of the target's heaviest kernels that the HLO defines, its time per call,
its output shape, the tail of its op name and the innermost frames of the project's source
that produced it (the HLO's stack-frame tables; frames inside jax, flax and the benchmark
drivers are left out).
"""

from __future__ import annotations

import argparse
import json
import re

_SKIP = ("jax/_src", "flax/", "benchmarks/profile", "benchmarks/train")


def _tables(lines: list[str]) -> tuple[dict, dict, dict, dict]:
    """The HLO's FileNames, FunctionNames, FileLocations and StackFrames tables."""
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    for line in lines:
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if not line.strip():
            if section == "StackFrames":
                break
            continue
        if section == "FileNames":
            i, name = line.split(" ", 1)
            files[int(i)] = name.strip('"')
        elif section == "FunctionNames":
            i, name = line.split(" ", 1)
            funcs[int(i)] = name.strip('"')
        elif section == "FileLocations":
            m = re.match(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", line)
            if m:
                locs[int(m[1])] = (int(m[2]), int(m[3]), int(m[4]))
        elif section == "StackFrames":
            m = re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", line)
            if m:
                frames[int(m[1])] = (int(m[2]), int(m[3]))
    return files, funcs, locs, frames


def source_stack(frame: int, tables) -> list[str]:
    """``file:line:function`` of frame ``frame`` and its parents, project frames only."""
    files, funcs, locs, frames = tables
    out, seen = [], set()
    while frame in frames and frame not in seen:
        seen.add(frame)
        loc, parent = frames[frame]
        f, fn, line = locs[loc]
        name = files[f].split("site-packages/")[-1]
        if not any(s in name for s in _SKIP):
            out.append(f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{line}:{funcs[fn]}")
        if parent == frame:
            break
        frame = parent
    return out


def hlo_name(kernel: str) -> str:
    """The HLO instruction name of a profiled fusion (``loop_add_fusion_67`` ->
    ``loop_add_fusion.67``)."""
    m = re.match(r"(.*?)_(\d+)$", kernel)
    return f"{m[1]}.{m[2]}" if m and ("fusion" in kernel or "convert" in kernel) else kernel


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hlo", help="the *after_optimizations.txt dump of the profiled program")
    p.add_argument("profile", help="profile.json written by benchmarks/profile.py")
    p.add_argument("target", help="the target's key in profile.json, e.g. train:32768:nsa")
    p.add_argument("--top", type=int, default=70)
    args = p.parse_args(argv)
    text = open(args.hlo).read()
    tables = _tables(text.split("\n"))
    kernels = json.load(open(args.profile))["targets"][args.target]["kernels"]
    for k in kernels[: args.top]:
        pattern = (r"^\s*(?:ROOT )?%" + re.escape(hlo_name(k["kernel"]))
                   + r" = ([^ ]+) .*?op_name=\"([^\"]+)\".*?stack_frame_id=(\d+)")
        m = re.search(pattern, text, re.M)
        if not m:
            continue
        print(f"{k['us_per_call']:9.0f} us x{k['per_call']:<3.0f} {k['kernel']:34s} "
              f"{m[1][:40]:40s} {m[2][-60:]}")
        print("      " + " <- ".join(source_stack(int(m[3]), tables)[:4]))


if __name__ == "__main__":
    main()
