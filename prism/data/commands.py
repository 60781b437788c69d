"""`prism data synth` and `prism data check`."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="prism data")
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write the fictitious-knowledge benchmark in the MUSE layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--n-forget", type=int, default=16)
    synth.add_argument("--n-retain", type=int, default=16)
    synth.add_argument("--n-holdout", type=int, default=16)
    jailbreak = sub.add_parser("jailbreak", help="write forget-domain prefill, multi-turn, AutoDAN and over-refusal files")
    jailbreak.add_argument("--data", required=True, help="MUSE-layout benchmark directory")
    jailbreak.add_argument("--out", required=True, help="directory for the four jailbreak files")
    jailbreak.add_argument("--limit", type=int, default=None, help="at most this many records per file")
    check = sub.add_parser("check", help="validate a benchmark's files and print counts per split")
    check.add_argument("--format", required=True, choices=["muse", "wmdp", "tofu", "jailbreak"])
    check.add_argument("path")
    args = parser.parse_args(argv)

    if args.command == "synth":
        from prism.data.synth import synthesize

        out = synthesize(args.out, seed=args.seed, n_forget=args.n_forget, n_retain=args.n_retain,
                         n_holdout=args.n_holdout)
        print(f"wrote {out}")
    elif args.command == "jailbreak":
        from prism.data.jailbreak_synth import write_jailbreak_suite

        for kind, path in write_jailbreak_suite(args.data, args.out, args.limit).items():
            print(f"{kind}: {path}")
    else:
        from prism.data.formats import check as check_files

        counts = check_files(args.format, args.path)
        print(json.dumps({"path": args.path, "format": args.format, "counts": counts}, indent=2))
    return 0
