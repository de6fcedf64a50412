"""`digit weights`: the pretrained weights this machine has (packaged encoders, Inception), with hashes and licences."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser(
        "weights",
        help="list the pretrained weights found on this machine (encoders, Inception)",
        description="List the pretrained weights digit can use offline: packaged encoder weights (--encoder-weights "
        "auto) and the FID Inception network (digit eval --features inception), each with its package, file, sha256 "
        "(verified), licence and source. Missing ones come with the command that installs them.",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from digit.weights import INSTALL_HINT, installed_report

    rows = installed_report()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for row in rows:
        print(f"{row['name']} [{row['kind']}]: {row['status']}")
        print(f"  package  {row['package']}")
        print(f"  file     {row.get('path') or row['file']}")
        if row.get("sha256"):
            print(f"  sha256   {row['sha256']}")
        print(f"  licence  {row['licence']}")
        print(f"  source   {row['source']}")
        if row.get("note"):
            print(f"  note     {row['note']}")
        if row.get("install"):
            print(f"  install  {row['install']}")
    if any(r["status"] == "not installed" for r in rows):
        print(f"all packaged weights: {INSTALL_HINT}")
    return 0
