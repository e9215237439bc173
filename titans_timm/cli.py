"""Command-line pieces shared by the titans-timm CLIs: one-line argparse errors, timm's ``key=value`` kwargs and
the unknown-model message."""
import argparse
import difflib
import sys
from typing import Optional

import timm
from timm.utils import ParseKwargs

__all__ = ['EXIT_BAD_INPUT', 'EXIT_INTERRUPTED', 'Parser', 'KeyValueKwargs', 'unknown_model']

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130   # stopped by Ctrl-C or SIGTERM after writing what resumes the work


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


def unknown_model(name: str) -> Optional[str]:
    """Why ``name`` is no timm model (with the closest registered names), or None; Hub and local names pass."""
    if name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:')) or timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f'did you mean {", ".join(close)}?' if close else 'see timm.list_models("*mag*")'
    return f'unknown model {name!r}; {hint}'
