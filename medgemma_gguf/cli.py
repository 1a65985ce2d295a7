"""The ``medgemma-gguf`` command line: one group, subcommands defined next to the code they run.

Each subcommand lives in its package (``convert/cli.py``, ``runtime/cli.py``, ``quant_eval/cli.py``)
and is imported only when used, so ``medgemma-gguf --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

import click

from medgemma_gguf import __version__
from medgemma_gguf.errors import UserError

# subcommand name -> "module:attribute" of its click command
SUBCOMMANDS: dict[str, str] = {
    "convert": "convert.cli:convert_command",
    "imatrix": "convert.imatrix_cli:imatrix_command",
    "quantize": "convert.quantize_cli:quantize_command",
    "chat": "runtime.cli:chat_command",
    "serve": "runtime.cli:serve_command",
    "fit": "runtime.cli:fit_command",
    "eval": "quant_eval.cli:eval_command",
    "demo": "convert.cli:demo_command",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="medgemma-gguf")
def cli() -> None:
    """Run Google's MedGemma locally as GGUF: convert, quantize, chat, evaluate."""


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning a UserError into one line on stderr and exit status 2."""
    try:
        cli.main(args=argv, prog_name="medgemma-gguf", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
