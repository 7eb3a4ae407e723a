"""``python -m vitpose.data.keypoints --list`` / ``--show SET``: the built-in keypoint sets, as JSON or a line each."""

from __future__ import annotations

import argparse
import json
import sys

from vitpose.data.keypoints import BUILTIN_SETS, CUSTOM, KeypointSetError, get_keypoint_set


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitpose.data.keypoints", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="one line per built-in set: name and keypoint count")
    p.add_argument("--show", metavar="NAME", help="one set's definition as JSON")
    args = p.parse_args(argv)
    if args.show:
        try:
            kset = get_keypoint_set(args.show)
        except KeypointSetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps({**kset.to_info(), "source": kset.source}))
        return 0
    if not args.list:
        p.print_help()
        return 2
    for kset in BUILTIN_SETS.values():
        print(f"{kset.name:<16} {kset.num_keypoints:>4}  {kset.source}")
    print(f"{CUSTOM:<16} {'-':>4}  data.keypoints=custom with data.custom_keypoints (names, flip_pairs, skeleton, "
          "sigmas)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
