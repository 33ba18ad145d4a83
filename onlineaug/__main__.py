"""Command line: ``python -m onlineaug demo`` and ``python -m onlineaug plan``.

Both write under the directory they run in (``./runs/demo``, ``./runs/plan``) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and ends every option's help with its default.

    An option whose help already says ``(default: ...)`` (a default that needs words, such as "the recipe's") is
    left as it is; a flag reads ``(default: off)``. Choices show in the option's metavar (``{a,b,c}``).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from onlineaug import demo, generate, plan

    parser = argparse.ArgumentParser(prog="python -m onlineaug", description=__doc__,
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,plan,generate}")
    demo.add_arguments(commands.add_parser(
        "demo", formatter_class=HelpFormatter,
        help="train a small CNN with a plain DataLoader and with online augmentation (--recipe); compare"))
    plan.add_arguments(commands.add_parser(
        "plan", formatter_class=HelpFormatter,
        help="how many GPUs should generate for a given trainer, or what the GPUs at hand sustain"))
    generate.add_arguments(commands.add_parser(
        "generate", formatter_class=HelpFormatter, help="fill a sample store offline with a recipe (resumable)"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from onlineaug import demo

        demo.run_demo(args)
    elif args.command == "plan":
        from onlineaug import plan

        plan.run_plan(args)
    elif args.command == "generate":
        from onlineaug import generate

        generate.run_generate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
