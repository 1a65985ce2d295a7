"""The ``medgemma-gguf`` command line: one group, subcommands defined next to the code they run.

Each subcommand lives in its stage (``convert/cli.py``, ``convert/quantize/cli.py``, ``runtime/cli.py``,
``quant_eval/cli.py``, ``fixtures/cli.py``)
and is imported only when used, so ``medgemma-gguf --help`` stays fast.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import click

from medgemma_gguf import __version__
from medgemma_gguf.errors import UserError
from medgemma_gguf.privacy import OFFLINE_ENV, enable_offline, offline_requested

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
    "batch": "medgemma_gguf.runtime.cli:batch_command",
    "eval": "medgemma_gguf.quant_eval.cli:eval_command",
    "check": "medgemma_gguf.quant_eval.cli:check_command",
    "demo": "medgemma_gguf.fixtures.cli:demo_command",
    "verify": "medgemma_gguf.cli:verify_command",
    "pull": "medgemma_gguf.hub_cli:pull_command",
    "push": "medgemma_gguf.convert.quantize.cli:push_command",
    "export": "medgemma_gguf.convert.quantize.cli:export_group",
}


# commands that always run offline (they never need the network)
ALWAYS_OFFLINE = {"serve"}


def _offline_option(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value or offline_requested() or ctx.info_name in ALWAYS_OFFLINE:
        enable_offline()


def offline_option() -> click.Option:
    """``--offline`` (eager: on before the command's code runs), also read from ``MEDGEMMA_GGUF_OFFLINE``."""
    return click.Option(["--offline"], is_flag=True, is_eager=True, expose_value=False, callback=_offline_option,
                        help=f"No network: Hugging Face offline and telemetry switches on, any connection beyond "
                             f"this machine refused (also env {OFFLINE_ENV}=1; serve is always offline).")


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use; each gets ``--offline``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not any(param.name == "offline" for param in command.params):
            command.params.insert(0, offline_option())
        return command


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="medgemma-gguf")
@click.option("--offline", is_flag=True, is_eager=True, expose_value=False, callback=_offline_option,
              help=f"No network for any command (as each command's --offline; env {OFFLINE_ENV}=1).")
def cli() -> None:
    """Run Google's MedGemma locally as GGUF: convert, quantize, chat, evaluate."""


@click.command("verify")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only what does not match.")
def verify_command(folder: Path, as_json: bool, quiet: bool) -> None:
    """Re-hash every file FOLDER's manifest.json lists; list what is missing, changed or extra.

    Exit status 0 when every listed file is present with its recorded size and sha256, 1 otherwise
    (2 when the manifest itself cannot be read).
    """
    from medgemma_gguf.integrity import verify_folder

    report = verify_folder(folder, progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        for check in report.files:
            if check.status != "ok" or not quiet:
                click.echo(f"  {check.status:<8} {check.path}" + (f" ({check.detail})" if check.detail else ""))
        for path in report.extra:
            click.echo(f"  {'extra':<8} {path} (not described by manifest.json)")
        for path, alive in report.partial:
            why = "being written by a running process" if alive else \
                "left by an interrupted run; the next convert or quantize removes or completes it"
            click.echo(f"  {'partial':<8} {path} ({why})")
        listed = len(report.files)
        if report.ok:
            click.echo(f"all {listed} files listed in {folder / 'manifest.json'} match")
        else:
            bad = ", ".join(f"{report.count(s)} {s}" for s in ("changed", "missing") if report.count(s))
            click.echo(f"{listed - report.count('ok')} of {listed} files do not match {folder / 'manifest.json'} "
                       f"({bad}); restore them, or rebuild them with `medgemma-gguf convert`/`quantize` and --force",
                       err=True)
    if not report.ok:
        raise click.exceptions.Exit(1)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning a UserError into one line on stderr and exit status 2. A command that
    ends with ``ctx.exit(code)`` (``check`` when a probe fails: 1) exits with that code."""
    if offline_requested():
        enable_offline()  # before any command imports the Hugging Face libraries
    try:
        status = cli.main(args=argv, prog_name="medgemma-gguf", standalone_mode=False)
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
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
