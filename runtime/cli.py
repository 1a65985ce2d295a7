"""``medgemma-gguf chat``, ``serve`` and ``fit``: click commands (registered in medgemma_gguf/cli.py)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import click

from medgemma_gguf.errors import UserError, setting
from medgemma_gguf.privacy import enable_offline
from medgemma_gguf.runtime.audit import DEFAULT_AUDIT_BACKUPS, DEFAULT_AUDIT_MAX_BYTES
from medgemma_gguf.runtime.context_settings import FLASH_ATTN_MODES, KV_TYPES, MAX_PARALLEL
from medgemma_gguf.runtime.http_limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S
from medgemma_gguf.runtime.prompt import load_presets
from medgemma_gguf.runtime.sources import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMAGES
from medgemma_gguf.runtime.study_cli import STUDY_OPTION_NAMES, build_study_turn, is_study, study_options

REPL_HELP = ("commands: /image PATH attaches an image to your next message, /reset starts a new conversation, "
             "/quit (or end of input) leaves")


def _parse_window(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        center, width = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("use CENTER,WIDTH, e.g. --window 40,400") from None
    if width < 1:
        raise click.BadParameter("the window width must be >= 1")
    return center, width


def _parse_logit_bias(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict | None:
    if not values:
        return None
    bias: dict[str, float] = {}
    for value in values:
        token, sep, amount = value.partition("=")
        try:
            bias[token.strip()] = float(amount)
        except ValueError:
            raise click.BadParameter(f"use TOKEN_ID=BIAS, e.g. --logit-bias 1234=-100 (got {value!r})") from None
        if not sep:
            raise click.BadParameter(f"use TOKEN_ID=BIAS, e.g. --logit-bias 1234=-100 (got {value!r})")
    return bias


def _read_text(_ctx: click.Context, _param: click.Parameter, path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path} as UTF-8 text ({exc})") from None


def _read_json_schema(ctx: click.Context, param: click.Parameter, path: Path | None) -> Any:
    text = _read_text(ctx, param, path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{path} is not JSON ({exc.msg} at line {exc.lineno}); pass a JSON Schema "
                                 "file") from None


class ContextSize(click.ParamType):
    """``--ctx``: a whole number of tokens >= 16, or ``auto``."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) or str(value).strip().lower() == "auto":
            return value if isinstance(value, int) else "auto"
        try:
            number = int(str(value).strip())
        except ValueError:
            self.fail(f"use a number of tokens or auto, got {value!r}", param, ctx)
        if number < 16:
            self.fail(f"use at least 16 tokens (or auto), got {number}", param, ctx)
        return number


def _context_options(command):
    """Options that shape the context and its KV cache (runtime.context_settings), shared by chat, serve and fit."""
    kv_types = click.Choice(list(KV_TYPES), case_sensitive=False)
    for option in reversed([
        click.option("--swa-full", is_flag=True,
                     help="Keep every position in the sliding-window layers (default: only their window)."),
        click.option("--kv-type", default="f16", show_default=True, type=kv_types,
                     help="KV cache type for K and V (q8_0 halves the cache, q4_0 quarters it)."),
        click.option("--kv-type-k", type=kv_types, help="K cache type (overrides --kv-type for K)."),
        click.option("--kv-type-v", type=kv_types,
                     help="V cache type (overrides --kv-type for V; a quantized V needs flash attention)."),
        click.option("--flash-attn", default="auto", show_default=True,
                     type=click.Choice(list(FLASH_ATTN_MODES), case_sensitive=False),
                     help="Flash attention: auto (llama.cpp decides; on for Gemma 3 on CPU and CUDA), on, off."),
    ]):
        command = option(command)
    return command


def _model_options(command):
    """Options shared by chat and serve: which files, where they run."""
    for option in reversed([
        click.argument("model", type=click.Path(path_type=Path)),
        click.option("--mmproj", type=click.Path(path_type=Path),
                     help="Vision mmproj GGUF (default: the one beside the model that fits it; F16 preferred)."),
        click.option("--quant", help="With a folder: the quant type or file name to load (default: with a GPU the "
                                     "best that fits; without one the best of at most 5.5 bits per weight)."),
        click.option("--ctx", "n_ctx", default="4096", show_default=True, type=ContextSize(),
                     help="Context size in tokens (an image takes 256), or auto: a one-shot prompt gets what it "
                          "needs, a chat or server the largest that fits the memory."),
        click.option("--n-gpu-layers", default="auto", show_default=True, help="'auto' (plan from --vram) or a count."),
        click.option("--vram", help="GPU memory to plan for, e.g. 6GiB (default: free memory of GPU 0)."),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores)."),
        click.option("--lora", "lora", multiple=True, type=click.Path(path_type=Path),
                     help="GGUF LoRA adapter to apply (convert-adapter writes one); repeat for several."),
        click.option("--lora-scaled", "lora_scaled", multiple=True, nargs=2, type=(click.Path(path_type=Path), float),
                     help="GGUF LoRA adapter and its scale, e.g. --lora-scaled my.gguf 0.5; repeatable."),
        click.option("--rpc", "rpc", multiple=True, metavar="HOST:PORT[,HOST:PORT...]",
                     help="Split the model across these RPC workers (medgemma-gguf worker); repeatable."),
    ]):
        command = option(command)
    return _context_options(command)


CONTEXT_OPTION_NAMES = ("swa_full", "kv_type", "kv_type_k", "kv_type_v", "flash_attn")


def _load(model: Path, mmproj: Path | None, quant: str | None, n_ctx: int | str, n_gpu_layers: str,
          vram: str | None, threads: int | None, lora: tuple[Path, ...] = (),
          lora_scaled: tuple[tuple[Path, float], ...] = (), rpc: tuple[str, ...] = (), **extra: Any):
    from medgemma_gguf.runtime.rpc_model import load

    adapters = [(path, 1.0) for path in lora] + list(lora_scaled)
    chat_model = load(model, mmproj, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, vram=vram, n_threads=threads,
                      quant=quant, lora=adapters, rpc=list(rpc) or None, **extra)
    where = f"{chat_model.model_path.name}" + (f" + {chat_model.mmproj_path.name}" if chat_model.mmproj_path else "")
    where += "".join(f" + LoRA {a.name} (scale {a.scale:g})" for a in chat_model.adapters)
    click.echo(f"loaded {where}", err=True)
    if chat_model.choice_note:
        click.echo(f"quant: {chat_model.choice_note}", err=True)
    if chat_model.mmproj_note:
        click.echo(f"mmproj: {chat_model.mmproj_note}" if chat_model.mmproj_path else
                   f"no mmproj (text only): {chat_model.mmproj_note}", err=True)
    if chat_model.plan is not None:
        click.echo(chat_model.plan.describe(), err=True)
    return chat_model


@click.command("chat")
@_model_options
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="Image file (PNG, JPEG, DICOM, ...); repeat for several.")
@click.option("--prompt", help="One-shot question; without it an interactive chat starts.")
@click.option("--system", help="System prompt (none by default).")
@click.option("--preset", type=click.Choice(sorted(load_presets())),
              help="A documented-use system prompt, or a notebook's task layout for --volume/--slide/--prior.")
@click.option("--max-tokens", default=256, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float,
              help="0 = greedy; > 0 samples (top-k/top-p default to the model's values).")
@click.option("--top-k", type=int, help="Keep the K most likely tokens (0 = off; default: the model's).")
@click.option("--top-p", type=float, help="Nucleus: keep tokens up to this probability mass (default: the model's).")
@click.option("--min-p", type=float, help="Drop tokens below this fraction of the top token's probability.")
@click.option("--repeat-penalty", type=float, help="Divide repeated tokens' logits by this (1 = off).")
@click.option("--repeat-last-n", type=int, help="Tokens the penalties look back over (default 64; -1 = all).")
@click.option("--presence-penalty", type=float, help="Subtract from tokens already generated (-2..2).")
@click.option("--frequency-penalty", type=float, help="Subtract per occurrence in the reply so far (-2..2).")
@click.option("--logit-bias", "logit_bias", multiple=True, metavar="TOKEN_ID=BIAS", callback=_parse_logit_bias,
              help="Add BIAS (-100..100) to a token's logit; repeat for several.")
@click.option("--seed", type=int, help="Sampling seed (with --temperature > 0): the same seed, the same reply.")
@click.option("--stop", multiple=True, help="End the reply where this text appears (not printed); up to 4.")
@click.option("--json-schema", "json_schema", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              callback=_read_json_schema, help="Constrain the reply to JSON valid under this JSON Schema file.")
@click.option("--grammar", type=click.Path(exists=True, dir_okay=False, path_type=Path), callback=_read_text,
              help="Constrain the reply to this GBNF grammar file (llama.cpp's format, rule 'root').")
@click.option("--think", is_flag=True,
              help="Start the system prompt with MedGemma's 'think silently if needed' instruction.")
@click.option("--show-thinking", is_flag=True, help="Print the model's reasoning block (on stderr); hidden otherwise.")
@click.option("--window", callback=_parse_window, help="CENTER,WIDTH grayscale window for 16-bit/DICOM images.")
@click.option("--max-image-pixels", default=50_000_000, show_default=True, type=click.IntRange(min=1),
              help="Width x height an image may have, checked from its header before decoding (bomb guard).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (needs --prompt); 'reasoning' apart.")
@study_options
def chat_command(model: Path, mmproj: Path | None, quant: str | None, n_ctx: int, n_gpu_layers: str,
                 vram: str | None, threads: int | None, lora: tuple[Path, ...],
                 lora_scaled: tuple[tuple[Path, float], ...], rpc: tuple[str, ...], images: tuple[Path, ...],
                 prompt: str | None,
                 system: str | None, preset: str | None, window: tuple[float, float] | None,
                 max_image_pixels: int, as_json: bool, **options: Any) -> None:
    """Chat with MODEL: a GGUF file, a folder of GGUFs (its manifest's, or as published by Unsloth,
    bartowski or ggml-org), where the default rule picks the quant (see --quant), or hf:REPO[:QUANT] (that
    quant and its mmproj downloaded from the Hub first, as `pull` does)."""
    from medgemma_gguf.runtime.sampling import sampling_settings

    study = {name: options.pop(name) for name in STUDY_OPTION_NAMES}
    context = {name: options.pop(name) for name in CONTEXT_OPTION_NAMES}
    think, show_thinking = options.pop("think"), options.pop("show_thinking")
    sampling_options = options
    task = load_presets()[preset] if preset is not None and load_presets()[preset].input else None
    if as_json and prompt is None and task is None:
        raise UserError("--json prints one reply; pass the question with --prompt")
    if system is not None and preset is not None and task is None:
        raise UserError("pass either --system or --preset, not both")
    sampling_options["stop"] = list(sampling_options["stop"]) or None
    sampling_settings(**sampling_options)  # bad settings are refused before the model loads
    if task is not None and not is_study(study):
        flag = "--prior" if task.input == "longitudinal" else f"--{task.input}"
        raise UserError(f"preset {preset} lays out a {task.input} prompt; pass {flag}")
    preset = None if task is not None else preset
    _check_input_paths(images, study)
    chat_model = _load(model, mmproj, quant, n_ctx, n_gpu_layers, vram, threads, lora, lora_scaled, rpc,
                       window=window, max_image_pixels=max_image_pixels, lazy_context=n_ctx == "auto" and not rpc,
                       **context)
    sampling = dict(sampling_options, think=think)

    def one_shot(messages: list[dict[str, Any]], **fields: Any) -> None:
        if n_ctx == "auto":  # the context this prompt and its reply need (rounded up to 256)
            positions = chat_model.prompt(messages, system=system, think=think, **fields).n_positions
            chat_model.allocate_context(positions + sampling_options["max_tokens"])
        result = chat_model.chat(messages, stream=not as_json, system=system, **fields, **sampling)
        _print_reply(result, as_json, show_thinking)

    with chat_model:
        turn = build_study_turn(chat_model, prompt=prompt, images=images, preset=task, study=study) if is_study(
            study) else None
        if turn is not None and (prompt is not None or (task is not None and turn.after is not None)):
            content = turn.items + ([{"type": "text", "text": turn.after}] if turn.after else [])
            one_shot([{"role": "user", "content": content}])
            return
        if turn is not None:
            _repl(chat_model, [], system=system, preset=preset, sampling=sampling, first=turn.items,
                  show_thinking=show_thinking)
            return
        if prompt is not None:
            content = [{"type": "text", "text": prompt}] + [{"type": "image", "path": str(p)} for p in images]
            one_shot([{"role": "user", "content": content}], preset=preset)
            return
        _repl(chat_model, list(images), system=system, preset=preset, sampling=sampling, show_thinking=show_thinking)


def _check_input_paths(images: tuple[Path, ...], study: dict[str, Any]) -> None:
    """Refuse a missing --image/--prior/--volume/--slide before the model loads (a 27B load takes minutes); what
    each file holds is checked when it is read."""
    from medgemma_gguf.runtime.sources import check_local_path

    studies = (("prior image", "prior"), ("volume", "volume"), ("slide", "slide"))
    named = [("image", path) for path in images] + [(what, study[key]) for what, key in studies
                                                     if study.get(key) is not None]
    for what, path in named:
        check_local_path(path, what=what, allow_local_files=True)


def _print_reply(result, as_json: bool, show_thinking: bool = False) -> None:
    """Print a reply: its text on stdout as it comes; the reasoning block on stderr with ``show_thinking``,
    else one note that the model is thinking. ``as_json``: the finished result as one JSON object."""
    from medgemma_gguf.runtime.reply import CONTENT

    if as_json:
        click.echo(json.dumps(result.to_json(), ensure_ascii=False))
        return
    thinking = False
    for channel, text in result.deltas():
        if channel == CONTENT:
            if thinking and show_thinking:
                click.echo(err=True)
            thinking = False
            click.echo(text, nl=False)
            sys.stdout.flush()
        elif show_thinking:
            click.echo(text, nl=False, err=True)
            thinking = True
        elif not thinking:
            click.echo("(thinking; --show-thinking prints it)", err=True)
            thinking = True
    if thinking and show_thinking:
        click.echo(err=True)
    click.echo()


def _repl(chat_model, images: list[Path], *, system: str | None, preset: str | None, sampling: dict,
          first: list[dict[str, Any]] | None = None, show_thinking: bool = False) -> None:
    """Multi-turn chat over stdin: each line is a user message; /image, /reset, /quit. ``first``: items (a
    volume's slices, a slide's patches) that go before the first line typed."""
    from medgemma_gguf.runtime.prompt import load_prompt_image

    pending: list[Any] = []
    for path in images:
        pending.append(load_prompt_image(path, _image_options(chat_model)))
    conversation: list[dict[str, Any]] = []
    stdin = sys.stdin
    click.echo(REPL_HELP, err=True)
    while True:
        click.echo("> ", nl=False, err=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                conversation.clear()
                pending.clear()
                first = None
                chat_model.reset()
                click.echo("(new conversation)", err=True)
            elif command == "/image":
                try:
                    pending.append(load_prompt_image(argument.strip(), _image_options(chat_model)))
                    click.echo(f"(image attached to your next message: {argument.strip()})", err=True)
                except UserError as exc:
                    click.echo(f"error: {exc.for_cli()}", err=True)
            else:
                click.echo(f"unknown command {command}; {REPL_HELP}", err=True)
            continue
        if first is not None:
            message = {"role": "user", "content": [*first, {"type": "text", "text": line}]
                       + [{"type": "image", "image": image} for image in pending]}
        else:
            message = {"role": "user", "content": [{"type": "text", "text": line}]
                       + [{"type": "image", "image": image} for image in pending]}
        try:
            stream = chat_model.chat([*conversation, message], stream=True, system=system, preset=preset, **sampling)
        except UserError as exc:
            click.echo(f"error: {exc.for_cli()}", err=True)
            continue
        _print_reply(stream, False, show_thinking)
        conversation += [message, {"role": "assistant", "content": stream.result.text}]
        pending.clear()
        first = None


def _image_options(chat_model):
    options = chat_model.image_options()
    if options is None:
        raise chat_model.no_vision_error()
    return options


def default_parallel() -> int:
    """``serve --parallel`` when not given: 4 slots on a GPU build (llama-server's default), 2 on the CPU."""
    from medgemma_gguf.runtime.offload import gpu_offload_supported

    return 4 if gpu_offload_supported()[0] else 2


@click.command("serve")
@_model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; beyond loopback (e.g. 0.0.0.0) needs --api-key or --insecure-no-auth.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-key", envvar="MEDGEMMA_API_KEY",
              help="Require 'Authorization: Bearer KEY' (or env MEDGEMMA_API_KEY); must not be empty.")
@click.option("--insecure-no-auth", is_flag=True,
              help="Serve beyond loopback without an API key: anyone who can reach the port can use the model.")
@click.option("--parallel", type=click.IntRange(1, MAX_PARALLEL),
              help="Requests decoded together (slots), each with --ctx positions [default: 4 on a GPU build, 2 on "
                   "the CPU].")
@click.option("--queue", "queue_size", default=32, show_default=True, type=click.IntRange(min=0),
              help="Requests that may wait for a slot; beyond them the server answers 429 with Retry-After.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds a request may take from its arrival (queue included); the reply ends there "
                   "[default: no limit].")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser pages from this origin (e.g. http://localhost:3000; '*' for any); repeatable. "
                   "Off by default.")
@click.option("--allow-local-files", is_flag=True,
              help="Accept local paths in requests, under the --allow-dir folders (default: the working directory).")
@click.option("--allow-dir", "allow_dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Accept local paths (images, series folders, slides) under this folder; repeat for several.")
@click.option("--max-body-bytes", default=DEFAULT_MAX_BODY_BYTES, show_default=True, type=click.IntRange(min=1024),
              help="Request size limit (the default fits an 85-slice 512x512 CT series zipped as base64).")
@click.option("--max-image-pixels", default=25_000_000, show_default=True, type=click.IntRange(min=1),
              help="Width x height an image may have, checked from its header before decoding (bomb guard).")
@click.option("--max-images", default=DEFAULT_MAX_IMAGES, show_default=True, type=click.IntRange(min=0),
              help="Images per request; a volume counts its slices, a slide its patches.")
@click.option("--max-tokens-limit", default=2048, show_default=True, type=click.IntRange(min=1))
@click.option("--header-timeout", default=DEFAULT_HEADER_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0.1, max=3600), help="Seconds a client has to send a request's headers.")
@click.option("--body-timeout", default=DEFAULT_BODY_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0.1, max=86400),
              help="Seconds a client has to send a whole request body (pauses of at most 30 s).")
@click.option("--audit-log", type=click.Path(path_type=Path, dir_okay=False),
              help="Append one JSON line per request to this file: time, client, API key id, model, token counts, "
                   "status, duration — no content.")
@click.option("--audit-log-max-bytes", default=DEFAULT_AUDIT_MAX_BYTES, show_default=True,
              type=click.IntRange(min=1024), help="Rotate the audit log at this size (FILE.1, FILE.2, ...).")
@click.option("--audit-log-backups", default=DEFAULT_AUDIT_BACKUPS, show_default=True, type=click.IntRange(min=0),
              help="Rotated audit logs kept.")
@click.option("--log-content", is_flag=True,
              help="Also log prompts and replies (at DEBUG) to the server's log; off by default, and no content is "
                   "logged without it at any level.")
def serve_command(model: Path, mmproj: Path | None, quant: str | None, n_ctx: int, n_gpu_layers: str,
                  vram: str | None, threads: int | None, lora: tuple[Path, ...],
                  lora_scaled: tuple[tuple[Path, float], ...], rpc: tuple[str, ...], host: str, port: int,
                  api_key: str | None,
                  insecure_no_auth: bool, parallel: int | None, queue_size: int, request_timeout: float | None,
                  cors_origins: tuple[str, ...], allow_local_files: bool, allow_dirs: tuple[Path, ...],
                  max_body_bytes: int, max_image_pixels: int, max_images: int, max_tokens_limit: int,
                  header_timeout: float, body_timeout: float, audit_log: Path | None, audit_log_max_bytes: int,
                  audit_log_backups: int, log_content: bool, **context: Any) -> None:
    """Serve MODEL with an OpenAI-compatible API (POST /v1/chat/completions, /v1/completions) and a web
    chat page at http://HOST:PORT/. It runs offline: no connection leaves this machine (see --offline).

    --parallel requests run at once, each in its own slot of --ctx positions (the KV cache holds
    parallel x ctx positions; llama-server's -c is the total instead). With --lora adapters, GET /v1/models
    lists MODEL (all adapters), MODEL+base and MODEL+ADAPTER; a request's "model" picks one of them.
    """
    from medgemma_gguf.runtime.audit import AuditLog
    from medgemma_gguf.runtime.http_limits import check_binding
    from medgemma_gguf.runtime.server import ServerLimits, serve

    enable_offline()  # serve never needs the network: no Hub, no telemetry (medgemma_gguf.privacy)

    if api_key is None and os.environ.get("MEDGEMMA_API_KEY") is not None:
        api_key = os.environ["MEDGEMMA_API_KEY"]  # click reads an empty variable as unset; it is refused below
    check_binding(host, api_key, insecure_no_auth=insecure_no_auth)  # before the model loads
    if insecure_no_auth and api_key is None:
        click.echo(f"warning: serving on {host} without an API key (--insecure-no-auth): anyone who can reach the "
                   "port can use the model", err=True)
    if log_content:
        click.echo("warning: --log-content writes prompts and replies to the server's log", err=True)
    parallel = parallel or default_parallel()
    limits = ServerLimits(max_body_bytes, max_image_pixels, max_images, max_tokens_limit,
                          header_timeout_s=header_timeout, body_timeout_s=body_timeout)
    serve_options: dict[str, Any] = {"api_key": api_key, "allow_local_files": allow_local_files, "limits": limits,
                     "allowed_roots": allow_dirs, "parallel": parallel, "queue_size": queue_size,
                     "request_timeout": request_timeout, "cors_origins": cors_origins, "log_content": log_content}
    if rpc:  # the model in an engine process of its own, behind this one (runtime.rpc_serve)
        from medgemma_gguf.runtime.rpc import parse_endpoints
        from medgemma_gguf.runtime.rpc_model import prepare_split
        from medgemma_gguf.runtime.rpc_serve import serve_split

        setup = prepare_split(model, mmproj, parse_endpoints(rpc), n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, vram=vram,
                              quant=quant, n_parallel=parallel, **context)
        click.echo(setup.plan.describe(), err=True)
        load_options = {"n_ctx": n_ctx, "n_threads": threads, "max_image_pixels": max_image_pixels,
                        "n_parallel": parallel, "lora": [(path, 1.0) for path in lora] + list(lora_scaled), **context}
        click.echo(f"{parallel} parallel slots of {n_ctx} positions each, queue of {queue_size}; the model runs in "
                   "an engine process of its own, so a worker that stops answering does not stop this server",
                   err=True)
        audit_spec = (audit_log, audit_log_max_bytes, audit_log_backups) if audit_log else None
        serve_split(setup, load_options, dict(serve_options, audit_spec=audit_spec), host=host, port=port,
                    header_timeout_s=header_timeout)
        return
    audit = AuditLog(audit_log, max_bytes=audit_log_max_bytes, backups=audit_log_backups) if audit_log else None
    chat_model = _load(model, mmproj, quant, n_ctx, n_gpu_layers, vram, threads, lora, lora_scaled,
                       max_image_pixels=max_image_pixels, n_parallel=parallel, **context)
    click.echo(f"{parallel} parallel slots of {chat_model.n_ctx} positions each, queue of {queue_size}", err=True)
    with chat_model:
        serve(chat_model, host=host, port=port, insecure_no_auth=insecure_no_auth, audit_log=audit, **serve_options)


@click.command("fit")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--vram", help="GPU memory budget, e.g. 6GiB (default: free memory of GPU 0, or RAM without a GPU).")
@click.option("--ctx", "n_ctx", default="4096", show_default=True, type=ContextSize(),
              help="Context size in tokens, or auto: the largest context each quant fits with.")
@click.option("--parallel", "n_seq", default=1, show_default=True, type=click.IntRange(1, MAX_PARALLEL),
              help="Sequences the context holds (the server's slots), each with --ctx positions.")
@click.option("--report", type=click.Path(path_type=Path),
              help="quant_eval report.json to rank by mean KL (default: FOLDER/report/report.json if present).")
@click.option("--json", "as_json", is_flag=True, help="Print the ranking as JSON.")
@_context_options
def fit_command(folder: Path, vram: str | None, n_ctx: int | str, n_seq: int, report: Path | None, as_json: bool,
                **context: Any) -> None:
    """Rank the quants in FOLDER that fit a memory budget, best first (by KL where a report exists, else by
    bits per weight), with what the best one needs; FOLDER may be any folder of GGUFs, or hf:REPO[:QUANT] (that
    quant is pulled first and the quants downloaded from REPO are ranked)."""
    from medgemma_gguf.pull import is_hub_spec, pull
    from medgemma_gguf.runtime.context_settings import ContextSettings
    from medgemma_gguf.runtime.offload import largest_context, plan_offload, query_free_vram
    from medgemma_gguf.runtime.quant_choice import available_memory_bytes, rank_quants
    from medgemma_gguf.sizes import format_size, parse_size

    auto = n_ctx == "auto"
    settings = ContextSettings(n_ctx=256 if auto else int(n_ctx), n_seq=n_seq, swa_full=context["swa_full"],
                               type_k=context["kv_type_k"] or context["kv_type"],
                               type_v=context["kv_type_v"] or context["kv_type"], flash_attn=context["flash_attn"],
                               n_outputs_max=n_seq)
    vram_bytes = parse_size(vram, setting("vram")) if vram else None
    if is_hub_spec(str(folder)):  # hf:REPO[:QUANT]: rank what has been downloaded of it, after pulling that quant
        pulled = pull(str(folder), report=lambda line: click.echo(line, err=True))
        folder = pulled.folder
    ranked = rank_quants(folder, n_ctx=settings.n_ctx, vram_bytes=vram_bytes, report=report, settings=settings)
    gpu = ranked[0].plan.gpu_available
    plans = {c.path: c.plan for c in ranked}
    max_context: dict[Path, int | None] = {}
    if auto:
        memory = (vram_bytes if vram_bytes is not None else query_free_vram()) if gpu else available_memory_bytes()
        for c in ranked:
            found = largest_context(c.path, memory_bytes=memory, gpu=gpu, settings=settings, mmproj_path=c.mmproj)
            max_context[c.path] = found
            if found is not None:
                plans[c.path] = plan_offload(c.path, vram_bytes=vram_bytes, mmproj_path=c.mmproj, gpu_available=gpu,
                                             settings=settings.with_(n_ctx=found))
    rows: list[dict[str, Any]] = []
    for c in ranked:
        plan = plans[c.path]
        rows.append({"file": c.path.relative_to(folder).as_posix(), "type": c.type, "bytes": c.bytes,
                     "bpw": round(c.bpw, 3),
                     "mmproj": c.mmproj.name if c.mmproj else None, "kld_mean": c.kld_mean,
                     "kld_mean_low": c.kld_bracket[0] if c.kld_bracket else None,
                     "kld_mean_high": c.kld_bracket[1] if c.kld_bracket and math.isfinite(c.kld_bracket[1]) else None,
                     "fits": c.fits and (not auto or max_context[c.path] is not None),
                     "n_gpu_layers": plan.n_gpu_layers,
                     "gpu_bytes": plan.gpu_bytes if plan.gpu_available else None, "cpu_bytes": plan.cpu_bytes,
                     "context": max_context.get(c.path) if auto else plan.n_ctx,
                     "breakdown": _breakdown(plan)})
    if as_json:
        click.echo(json.dumps({"context": n_ctx, "parallel": n_seq, "vram_bytes": vram_bytes,
                               "settings": settings.describe() if not auto else settings.with_(
                                   n_ctx=4096).describe().replace("context 4096", "context auto"),
                               "quants": rows}))
        return
    budget = f"{vram} of GPU memory" if vram else ("the free GPU memory" if gpu else "the available RAM")
    by = "mean KL divergence (report)" if any(r["kld_mean"] is not None for r in rows) else "bits per weight"
    slots = f" x {n_seq} slots" if n_seq > 1 else ""
    what = "the largest context each fits" if auto else f"a {n_ctx}-token context{slots}"
    click.echo(f"quants for {what} within {budget}, ranked by {by}:")
    previous = None
    for rank, row in enumerate(r for r in rows if r["fits"]):
        high = row["kld_mean_high"] if row["kld_mean_high"] is not None else math.inf
        kl = f"  mean KL {row['kld_mean']:.4g} [{row['kld_mean_low']:.4g}, {high:.4g}]" \
            if row["kld_mean"] is not None else (
            "  (not in the report: ranked after the measured ones; re-run eval)" if by.startswith("mean KL") else "")
        if previous is not None and row["kld_mean"] is not None and row["kld_mean_low"] <= previous:
            kl += "  (bracket overlaps the one above: the order of the two is not established)"
        previous = high if row["kld_mean"] is not None else None
        need = row["gpu_bytes"] if gpu else row["cpu_bytes"]
        room = f"  context up to {row['context']}{slots}" if auto else ""
        click.echo(f"{rank + 1:>3}. {row['file']}  {row['type']}  {row['bpw']:.2f} bpw  needs "
                   f"{format_size(need)}{room}{kl}")
    too_big = [r for r in rows if not r["fits"]]
    if len(too_big) == len(rows):
        click.echo("  none fits; the smallest would run partly offloaded (lower --ctx, use --kv-type q8_0 or "
                   "quantize further)")
    for row in too_big:
        need = row["gpu_bytes"] if gpu else row["cpu_bytes"]
        click.echo(f"  does not fit: {row['file']}  {row['type']}  needs {format_size(need)}")
    best = next((c for c in ranked if c.fits and (not auto or max_context[c.path] is not None)), None)
    if best is not None:
        click.echo(f"\nwhat {best.path.name} needs:")
        click.echo(plans[best.path].describe())


def _breakdown(plan) -> dict[str, Any]:
    """A plan's buffers in bytes, for ``fit --json``."""
    return {"gpu": {"weights": plan.gpu_weights, "kv": plan.gpu_kv, "mmproj": plan.gpu_mmproj,
                    "compute": plan.gpu_compute} if plan.gpu_available else None,
            "cpu": {"weights": plan.cpu_weights, "kv": plan.cpu_kv, "mmproj": plan.cpu_mmproj,
                    "compute": plan.cpu_compute, "logits": plan.cpu_output},
            "kv_full_attention": plan.kv.full_bytes if plan.kv else None,
            "kv_sliding_window": plan.kv.swa_bytes if plan.kv else None,
            "cells_full_attention": plan.kv.cells_full if plan.kv else None,
            "cells_sliding_window": plan.kv.cells_swa if plan.kv else None,
            "text_compute": plan.text_compute, "vision_compute": plan.vision_compute,
            "headroom": plan.headroom_bytes}


@click.command("worker")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; beyond loopback needs --insecure-network (no authentication, no encryption).")
@click.option("--port", default=50052, show_default=True, type=click.IntRange(1, 65535))
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads of a CPU device (default: half the cores).")
@click.option("--device", "devices", multiple=True,
              help="ggml device to offer (e.g. CUDA0); repeatable (default: every GPU, else the CPU).")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Keep received weights in this folder, so the next load sends only their hashes.")
@click.option("--insecure-network", is_flag=True,
              help="Listen beyond loopback: anyone who can reach the port can run code on this device.")
def worker_command(host: str, port: int, threads: int | None, devices: tuple[str, ...], cache_dir: Path | None,
                   insecure_network: bool) -> None:
    """Lend this machine's GPU (or CPU) to a model split across machines: llama.cpp's RPC server, from the
    same llama.cpp build as the client (chat/serve --rpc HOST:PORT). Runs until stopped (Ctrl-C)."""
    from medgemma_gguf.runtime.rpc import serve_worker

    serve_worker(host, port, threads=threads, cache_dir=cache_dir, devices=devices,
                 insecure_network=insecure_network, announce=lambda line: click.echo(line, err=True))
@click.command("batch")
@_model_options
@click.argument("input_path", metavar="IN.jsonl", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Output JSONL, one line per input line; an existing one is resumed (its ids are skipped).")
@click.option("--force", is_flag=True, help="Start the output over instead of resuming it.")
@click.option("--strict", is_flag=True, help="Stop at the first bad line (before the model loads when it can).")
@click.option("--system", help="System prompt for lines without their own.")
@click.option("--max-tokens", default=256, show_default=True, type=int, help="Default for lines without their own.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="Default (0 = greedy).")
@click.option("--top-k", type=int, help="Default top-k (0 = off; default: the model's).")
@click.option("--top-p", type=float, help="Default top-p (default: the model's).")
@click.option("--min-p", type=float, help="Default min-p.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Base seed: a line without its own samples with a seed from this and its id.")
@click.option("--think", is_flag=True, help="Default: MedGemma's 'think silently if needed' system prefix.")
@click.option("--parallel", default=1, show_default=True, type=int,
              help="Lines run at once in the server's slots (continuous batching; the KV cache holds N x --ctx "
                   "positions). Output stays in input order and resumable; a greedy reply equals the one-at-a-time "
                   "reply except after a near-tie of the top two logits, a seeded sampled reply reproduces only "
                   "with 1.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def batch_command(ctx: click.Context, model: Path, mmproj: Path | None, quant: str | None, n_ctx: int,
                  n_gpu_layers: str, vram: str | None, threads: int | None, lora: tuple[Path, ...],
                  lora_scaled: tuple[tuple[Path, float], ...], input_path: Path, out: Path, force: bool, strict: bool,
                  system: str | None, seed: int, think: bool, parallel: int, quiet: bool, **defaults: Any) -> None:
    """Run every conversation of IN.jsonl through MODEL and write one JSONL line per input line to --out.
    Resumable (ids already in --out are skipped), reproducible (a seed per line), kill-safe (each line is on
    disk before the next starts). --parallel N runs N lines at once, output still in input order. Exit 0 when
    every line was answered, 1 when lines were skipped, 2 with --strict at the first bad line."""
    from medgemma_gguf.runtime.batch import check_parallel, done_ids, read_input, run_batch

    check_parallel(parallel)
    defaults = {**defaults, "system": system, "think": think}
    lines, bad = read_input(input_path, defaults, seed)
    for number, line_id, problem in bad:
        where = f"line {number}" + (f" (id {line_id})" if line_id else "")
        if strict:
            raise UserError(f"{input_path} {where}: {problem}; fix it, or drop --strict to skip bad lines")
        click.echo(f"{input_path} {where}: {problem}; skipped", err=True)
    if force and out.exists():
        out.unlink()
    done = done_ids(out)
    if done:
        click.echo(f"resuming {out}: {len([x for x in lines if x.id in done])} of {len(lines)} lines already done",
                   err=True)
    if not lines:
        raise UserError(f"{input_path} has no usable line; fix the lines above")
    chat_model = _load(model, mmproj, quant, n_ctx, n_gpu_layers, vram, threads, lora, lora_scaled,
                       n_parallel=parallel)
    with chat_model:
        summary = run_batch(chat_model, lines, bad, out, input_path=input_path, base_seed=seed, n_threads=threads,
                            strict=strict, progress=not quiet, echo=lambda text: click.echo(text, err=True),
                            parallel=parallel)
    click.echo(f"wrote {summary.written} lines to {out} ({summary.already_done} already there, "
               f"{len(summary.skipped)} skipped); provenance in {summary.provenance}", err=True)
    if summary.skipped:
        ctx.exit(1)
