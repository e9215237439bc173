"""Command-line pieces shared by the titans-timm CLIs: one-line argparse errors and timm's ``key=value`` kwargs."""
import argparse
import sys

from timm.utils import ParseKwargs

__all__ = ['EXIT_BAD_INPUT', 'Parser', 'KeyValueKwargs']

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error:`` line and exit status 2, like every other bad input here."""

    def error(self, message):
        print(f'error: {message} (see {self.prog} --help)', file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


class KeyValueKwargs(ParseKwargs):
    """timm's ``k=v`` list action (values read as Python literals), naming an item that has no ``=``."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [v for v in values if '=' not in v]
        if bad:
            parser.error(f'{option_string} {bad[0]}: expected key=value items, e.g. {option_string} depth=2 '
                         f'patch_size=8')
        super().__call__(parser, namespace, values, option_string)
