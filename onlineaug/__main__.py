"""Command line: ``python -m onlineaug demo`` and ``python -m onlineaug plan``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onlineaug", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from onlineaug import demo, generate, plan

    demo.add_arguments(commands.add_parser("demo", help="train a small CNN vanilla and with online GenMix; compare"))
    plan.add_arguments(commands.add_parser("plan", help="how many GPUs should generate for a given trainer"))
    generate.add_arguments(commands.add_parser("generate", help="fill a sample store offline (resumable)"))

    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.run_demo(args)
    elif args.command == "plan":
        plan.run_plan(args)
    elif args.command == "generate":
        generate.run_generate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
