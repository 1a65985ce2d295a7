"""The ``medgemma-gguf`` command line: one group, subcommands defined next to the code they run.

Each subcommand lives in its stage (``convert/cli.py``, ``convert/quantize/cli.py``, ``runtime/cli.py``,
``quant_eval/cli.py``, ``fixtures/cli.py``)
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
    "convert": "medgemma_gguf.convert.cli:convert_command",
    "convert-adapter": "medgemma_gguf.convert.cli:convert_adapter_command",
    "imatrix": "medgemma_gguf.convert.quantize.cli:imatrix_command",
    "quantize": "medgemma_gguf.convert.quantize.cli:quantize_command",
    "chat": "medgemma_gguf.runtime.cli:chat_command",
    "serve": "medgemma_gguf.runtime.cli:serve_command",
    "fit": "medgemma_gguf.runtime.cli:fit_command",
    "worker": "medgemma_gguf.runtime.cli:worker_command",
    "eval": "medgemma_gguf.quant_eval.cli:eval_command",
    "demo": "medgemma_gguf.fixtures.cli:demo_command",
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
        click.echo(f"error: {exc.for_cli()}", err=True)
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
