"""Chat prompts built exactly as the Hugging Face Gemma 3 processor builds them, as token runs and images.

The steps, each matching transformers (``processing_utils.ProcessorMixin.apply_chat_template``,
``utils/chat_template_utils.py`` and ``models/gemma3/processing_gemma3.py``):

1. Render the GGUF's ``tokenizer.chat_template`` with a sandboxed jinja2 environment set up as
   transformers sets it up (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``,
   ``strftime_now``, a ``tojson`` that does not escape HTML), the model's ``bos_token`` text and
   ``add_generation_prompt=True``. Gemma 3's template emits ``<start_of_image>`` once per image item.
2. Replace every ``<start_of_image>`` with the processor's full image sequence,
   ``\\n\\n<start_of_image>`` + image + ``<end_of_image>\\n\\n``.
3. Tokenize with special tokens parsed and no BOS added: the template already starts with ``<bos>``, so
   the prompt holds exactly one (the processor likewise sets ``add_special_tokens=False`` when the
   rendered prompt starts with the BOS text, and adds one otherwise — so do we).

The text is tokenized in runs split at the image sequences. Both tokenizers cut text at special tokens
before tokenizing, so runs split right after ``<start_of_image>`` and right before ``<end_of_image>``
give the same ids as one call over the processor's whole string.

Images come as file paths, ``data:`` URIs, PIL images, uint8 arrays or raw bytes; every one is turned
into the model's native ``image_size`` x ``image_size`` RGB (``runtime.images``) so libmtmd copies the
pixels unchanged. Remote URLs (http, https, ftp, ...) are never fetched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medgemma_gguf.errors import AccessError, ResourceError, UserError, setting, unknown_fields
from medgemma_gguf.runtime.images import (
    DEFAULT_MAX_PIXELS,
    image_to_rgb_array,
    load_image,
    load_image_from_data_uri,
    prepare_for_model,
)
from medgemma_gguf.runtime.sources import DEFAULT_MAX_FILE_BYTES
from medgemma_gguf.runtime.studies import STUDY_ITEM_TYPES, expand_item

TEMPLATE_MAX_SECONDS = 5.0  # a chat template renders a conversation in milliseconds
TEMPLATE_MAX_CHARS = 8 * 2**20  # far beyond a 128k-token context
IMAGE_START = "<start_of_image>"
IMAGE_END = "<end_of_image>"
PRESETS_PATH = Path(__file__).with_name("presets.toml")
# Google's MedGemma 27B model card: a system prompt starting with this makes the model reason first, in a
# <unused94>thought ... <unused95> block (runtime.reply separates it)
THINK_SYSTEM_PREFIX = "SYSTEM INSTRUCTION: think silently if needed."
ROLES = ("system", "user", "assistant")
_URL_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://")

Tokenize = Callable[[str], list[int]]


# --- presets ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named prompt for one of MedGemma's documented uses.

    A system-prompt preset has ``system``. A task preset (``input`` = "volume", "slide" or "longitudinal")
    holds the user-turn texts of one of Google's notebooks instead: ``instruction`` before the images and
    ``question`` after them (see ``runtime.studies``).
    """

    name: str
    system: str | None
    description: str
    input: str | None = None
    instruction: str | None = None
    question: str | None = None
    prompt_hint: str | None = None


def load_presets(path: Path = PRESETS_PATH) -> dict[str, Preset]:
    """The presets in ``presets.toml``, by name."""
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    return {name: Preset(name, row.get("system"), str(row.get("description", "")), row.get("input"),
                         row.get("instruction"), row.get("question"), row.get("prompt_hint"))
            for name, row in data.items()}


def preset_system(name: str) -> str:
    """The system prompt of preset ``name``; UserError naming the presets for an unknown one."""
    presets = load_presets()
    if name not in presets:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(sorted(presets))}")
    if presets[name].system is None:
        raise UserError(f"preset {name!r} lays out a {presets[name].input} prompt, not a system prompt; use it with "
                        f"runtime.studies.task_layout (the CLI's --{presets[name].input})")
    return str(presets[name].system)


def resolve_system(system: str | None, preset: str | None) -> str | None:
    """The system prompt from ``system`` or ``preset`` (not both); None when neither is given."""
    if system is not None and preset is not None:
        raise UserError("pass either a system prompt or a preset, not both")
    if preset is not None:
        return preset_system(preset)
    return system


# --- images -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageOptions:
    """How images in messages are loaded: model size, grayscale window, size cap, local files allowed (anywhere,
    or under ``allowed_roots``); ``max_images`` per request, and the context (``n_ctx``, ``image_tokens`` per
    image) that volumes and slides are checked against before they are decoded."""

    image_size: int
    window: tuple[float, float] | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_local_files: bool = True
    allowed_roots: tuple[Path, ...] = ()
    max_images: int | None = None
    n_ctx: int | None = None
    image_tokens: int = 0
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    def room(self, used: int) -> int | None:
        """How many more images the context could hold after ``used`` (text not counted), or None."""
        if self.n_ctx is None or self.image_tokens < 1:
            return None
        return (self.n_ctx - 1) // self.image_tokens - used


@dataclass(frozen=True, eq=False)
class PromptImage:
    """An image at the model's native size: uint8 [image_size, image_size, 3]; ``key`` identifies its pixels."""

    pixels: np.ndarray
    key: str

    @classmethod
    def from_pil(cls, img: Image.Image, image_size: int) -> PromptImage:
        pixels = image_to_rgb_array(prepare_for_model(img, image_size))
        digest = hashlib.sha256(pixels.tobytes())
        digest.update(repr(pixels.shape).encode())
        return cls(pixels, digest.hexdigest())


def _check_pixels(width: int, height: int, label: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise UserError(
            f"{label} is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}; "
            f"downscale it or raise {setting('max_image_pixels')}"
        )


def _array_to_pil(array: np.ndarray, options: ImageOptions) -> Image.Image:
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise UserError(
            f"an image array must be uint8 of shape [height, width], [height, width, 3] or [height, width, 4]; "
            f"got {array.dtype} {tuple(array.shape)}"
        )
    _check_pixels(array.shape[1], array.shape[0], "image array", options.max_pixels)
    return Image.fromarray(np.ascontiguousarray(array))


def _load_reference(reference: str, options: ImageOptions) -> Image.Image:
    """A ``data:`` URI, ``file://`` URL or local path; remote URLs are refused (server-side request forgery)."""
    text = reference.strip()
    if text[:5].lower() == "data:":
        return load_image_from_data_uri(text, window=options.window, max_pixels=options.max_pixels)
    match = _URL_SCHEME.match(text)
    if match is not None and match["scheme"].lower() != "file":
        raise UserError(
            f"image URL scheme {match['scheme']!r} is not allowed: remote images are never fetched; "
            "send the image inline as a data: URI (data:image/png;base64,...)"
        )
    path = text[len("file://"):] if match is not None else text
    return _load_local(Path(path), options)


def _load_local(path: Path, options: ImageOptions) -> Image.Image:
    """An image file from a local path, where allowed: anywhere with ``allow_local_files``, else only under
    ``allowed_roots``; regular files only, size-limited before reading (``runtime.sources.read_regular_file``)."""
    roots = () if options.allow_local_files else options.allowed_roots
    if not options.allow_local_files and not roots:
        raise AccessError(
            "local image paths are not allowed here; send the image inline as a data: URI "
            f"(paths are accepted only with {setting('allow_local_files')} or under {setting('allow_dir')})"
        )
    return load_image(path, window=options.window, max_pixels=options.max_pixels,
                      max_file_bytes=options.max_file_bytes, allowed_roots=roots)


def load_prompt_image(source: Any, options: ImageOptions) -> PromptImage:
    """Turn a path, URI string, ``os.PathLike``, PIL image, uint8 array or bytes into a ``PromptImage``."""
    if isinstance(source, PromptImage):
        return source
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, "image", options.max_pixels)
        img = source
    elif isinstance(source, np.ndarray):
        img = _array_to_pil(source, options)
    elif isinstance(source, bytes | bytearray | memoryview):
        img = load_image(bytes(source), window=options.window, max_pixels=options.max_pixels)
    elif isinstance(source, os.PathLike):
        img = _load_local(Path(source), options)
    elif isinstance(source, str):
        img = _load_reference(source, options)
    else:
        raise UserError(
            f"cannot use a {type(source).__name__} as an image; pass a path, a data: URI, a PIL image or a "
            "uint8 array"
        )
    return PromptImage.from_pil(img, options.image_size)


# --- messages -----------------------------------------------------------------------------------------

# the fields each kind of content item has (null counts as absent); a field not listed is refused, never ignored.
# Volume and slide items check their own fields (runtime.studies).
CONTENT_ITEM_FIELDS: dict[str, frozenset[str]] = {
    "text": frozenset(("type", "text")),
    "image": frozenset(("type", "image", "path", "url")),  # Hugging Face's shape
    "image_url": frozenset(("type", "image_url")),  # OpenAI's shape: {"url": ..., "detail": ...}
    "longitudinal": frozenset(("type", "prior", "current")),
}
IMAGE_URL_FIELDS = frozenset(("url", "detail"))
# OpenAI's image_url.detail values this model honours: it sees every image at its one resolution (896 x 896 for
# MedGemma, 256 tokens), which is what "high" asks for and what "auto" gets
IMAGE_DETAILS = ("auto", "high")


def content_item_problem(item: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(field, problem)`` for the first field of content item ``item`` that is not honoured, or None.

    ``field`` is the path inside the item (``"cache_control"``, ``"image_url.detail"``) for the caller to place
    in its own words (``messages[0].content[1].…`` on the server)."""
    kind = item.get("type")
    known = CONTENT_ITEM_FIELDS.get(kind) if isinstance(kind, str) else None
    if known is None:
        return None  # an unknown kind, or a study item that checks its own fields
    extra = unknown_fields(item, known)
    if extra:
        listed = " and ".join(f"'{k}'" for k in sorted(known))
        return extra[0], f"is not a field of a content item of type '{kind}' (it has {listed}); remove it"
    ref = item.get("image_url")
    if kind == "image_url" and isinstance(ref, Mapping):
        extra = unknown_fields(ref, IMAGE_URL_FIELDS)
        if extra:
            return f"image_url.{extra[0]}", "is not supported: image_url has 'url' and 'detail'; remove it"
        detail = ref.get("detail")
        if detail is not None and detail not in IMAGE_DETAILS:
            return "image_url.detail", (f"{detail!r} is not supported: the model sees every image at its one "
                                        "resolution (256 tokens); use 'auto' or 'high', or leave it out")
    return None



def _image_source(item: Mapping[str, Any]) -> Any:
    """Where an image content item keeps its image (HF: image / path / url; OpenAI: image_url)."""
    if item.get("type") == "image_url":
        ref = item.get("image_url")
        url = ref.get("url") if isinstance(ref, Mapping) else ref
        if not isinstance(url, str) or not url:
            raise UserError('an image_url item needs {"image_url": {"url": "data:image/png;base64,..."}}')
        return url
    for key in ("image", "path", "url"):
        if item.get(key) is not None:
            return item[key]
    raise UserError('an image item needs "image" (PIL image or array), "path" or "url"')


def _normalize_content(content: Any, role: str, index: int, options: ImageOptions | None,
                       used: list[int]) -> str | list[dict]:
    where = f"message {index} ({role})"
    if isinstance(content, str):
        return content
    if not isinstance(content, list | tuple):
        raise UserError(f"{where}: content must be a string or a list of text/image items")
    items: list[dict] = []
    for number, item in enumerate(content):
        if not isinstance(item, Mapping):
            raise UserError(f"{where}: each content item must be an object with a \"type\"")
        problem = content_item_problem(item)
        if problem is not None:
            raise UserError(f"{where}, content item {number}: '{problem[0]}' {problem[1]}")
        kind = item.get("type")
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise UserError(f"{where}: a text item needs a string \"text\"")
            items.append({"type": "text", "text": item["text"]})
        elif kind in ("image", "image_url", *STUDY_ITEM_TYPES):
            if role != "user":
                raise UserError(f"{where}: only user messages may carry images")
            if options is None:
                raise UserError(f"this model was loaded without an mmproj; pass one ({setting('mmproj')}) to "
                                f"send images")
            expanded: Iterable[Mapping[str, Any]] = [item] if kind in ("image", "image_url") else expand_item(
                item, options, room=options.room(used[0]), image_tokens=options.image_tokens, n_ctx=options.n_ctx,
                max_images=None if options.max_images is None else options.max_images - used[0])
            try:
                for part in expanded:
                    if part["type"] == "text":
                        items.append(dict(part))
                        continue
                    used[0] += 1
                    if options.max_images is not None and used[0] > options.max_images:
                        raise ResourceError(f"the messages hold more than {options.max_images} images, the most "
                                            f"allowed per request ({setting('max_images')}); send fewer")
                    items.append({"type": "image", "image": load_prompt_image(_image_source(part), options)})
            finally:
                if hasattr(expanded, "close"):
                    expanded.close()  # a volume or slide being read is closed at once, also on an error
        else:
            raise UserError(f"{where}: unknown content item type {kind!r}; use \"text\", \"image\", \"volume\", "
                            "\"slide\" or \"longitudinal\"")
    return items


def normalize_messages(
    messages: Sequence[Mapping[str, Any]], *, system: str | None = None, images: ImageOptions | None = None
) -> list[dict[str, Any]]:
    """Validate HF/OpenAI-style messages, load their images, and put ``system`` first if given.

    Returns messages whose content is a string or a list of ``{"type": "text", "text"}`` and
    ``{"type": "image", "image": PromptImage}`` items. ``images=None`` means the model has no vision.
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise UserError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    out: list[dict[str, Any]] = []
    used = [0]
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise UserError(f"message {index} must be an object with \"role\" and \"content\"")
        role = message["role"]
        if role not in ROLES:
            raise UserError(f"message {index} has role {role!r}; use one of {', '.join(ROLES)}")
        if role == "system" and index != 0:
            raise UserError("a system message may only come first")
        out.append({"role": role, "content": _normalize_content(message["content"], role, index, images, used)})
    if system is not None:
        if out[0]["role"] == "system":
            raise UserError("the messages already start with a system message; drop the extra system prompt")
        out.insert(0, {"role": "system", "content": system})
    if out[0]["role"] == "system" and isinstance(out[0]["content"], list) and not out[0]["content"]:
        raise UserError("the system message is empty")
    return out


def prompt_images(messages: Iterable[Mapping[str, Any]]) -> list[PromptImage]:
    """The images of normalized messages, in prompt order."""
    return [item["image"] for m in messages if isinstance(m["content"], list)
            for item in m["content"] if item["type"] == "image"]


# --- template -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """``template`` compiled in an environment set up as transformers sets it up (cached per template)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        """Refuses ``*`` and ``**`` whose result would be enormous (``"x" * 10**9``, ``10 ** 10 ** 10``): they
        run inside one C call, where the render's time limit cannot stop them."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for sequence, count in ((left, right), (right, left)):
                    if (isinstance(sequence, str | list | tuple) and isinstance(count, int)
                            and len(sequence) * count > TEMPLATE_MAX_CHARS):
                        raise _limit(f"builds a sequence of {len(sequence) * count} items")
            elif operator == "**" and isinstance(right, int) and isinstance(left, int) and abs(right) > 4096:
                raise _limit(f"raises a number to the power {right}")
            return super().call_binop(context, operator, left, right)

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class TemplateLimitError(ResourceError):
    """A chat template went past ``TEMPLATE_MAX_SECONDS`` or ``TEMPLATE_MAX_CHARS``; ``what`` says how."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(f"the model's chat template {what}, beyond its limits ({TEMPLATE_MAX_SECONDS:g} s, "
                         f"{TEMPLATE_MAX_CHARS} characters); shorten the conversation, or fix the template "
                         "(tokenizer.chat_template)")


def _limit(what: str) -> TemplateLimitError:
    return TemplateLimitError(what)


def _limited_render(compiled: Any, context: dict[str, Any]) -> str:
    """``compiled.generate(**context)`` joined, stopped with ResourceError past ``TEMPLATE_MAX_SECONDS`` or
    ``TEMPLATE_MAX_CHARS``. The time is checked on every line the template's own code runs (a trace on the
    frames jinja2 compiles, "<template>"; other code runs untraced), so a loop that writes nothing is
    stopped too. The caller's trace function (a debugger, coverage) is restored afterwards."""
    deadline = time.monotonic() + TEMPLATE_MAX_SECONDS

    def local(_frame: Any, event: str, _arg: Any) -> Any:
        if event == "line" and time.monotonic() > deadline:
            raise _limit(f"ran for more than {TEMPLATE_MAX_SECONDS:g} s")
        return local

    def calls(frame: Any, _event: str, _arg: Any) -> Any:
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        pieces, total = [], 0
        for piece in compiled.generate(**context):
            total += len(piece)
            if total > TEMPLATE_MAX_CHARS:
                raise _limit(f"wrote more than {TEMPLATE_MAX_CHARS} characters")
            pieces.append(piece)
        return "".join(pieces)
    finally:
        sys.settrace(previous)


def render_template(template: str, messages: Sequence[Mapping[str, Any]], *, bos_token: str,
                    eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """The chat template's text for normalized ``messages`` (each image item rendered as the template does).

    Rendering is limited to ``TEMPLATE_MAX_SECONDS`` and ``TEMPLATE_MAX_CHARS`` (ResourceError, HTTP 413,
    past either): a template from a checkpoint is code, and one that loops for ever must not hang ``chat``
    or block ``serve``. ``convert`` refuses a template that exceeds them on a standard conversation.
    """
    import jinja2

    plain = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
              [{"type": "image"} if item["type"] == "image" else dict(item) for item in m["content"]]}
             for m in messages]
    try:
        return _limited_render(_compiled_template(template), dict(
            messages=plain, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt))
    except jinja2.TemplateError as exc:
        raise UserError(f"the model's chat template rejected the conversation: {exc}") from exc
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise _limit(f"failed ({type(exc).__name__})") from exc


# a conversation every chat template must render within the limits (checked by convert)
STANDARD_CONVERSATION = (
    {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
    {"role": "user", "content": [{"type": "text", "text": "Describe this X-ray."}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A normal chest X-ray."}]},
    {"role": "user", "content": [{"type": "text", "text": "Any effusion?"}]},
)


def check_template(template: str, *, bos_token: str = "<bos>") -> None:
    """Render ``STANDARD_CONVERSATION`` with ``template``: ResourceError when it exceeds the limits,
    UserError when it fails (what ``convert`` refuses to write)."""
    render_template(template, STANDARD_CONVERSATION, bos_token=bos_token)


# --- tokens -------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """A prompt ready to evaluate: token runs and images, in order.

    ``text`` is the rendered template (images shown as ``<start_of_image>``); ``image_tokens`` is how many
    positions each image takes in the model.
    """

    parts: list[list[int] | PromptImage]
    text: str
    image_tokens: int
    units: list[int | tuple[str, str, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.units = []
        for part in self.parts:
            if isinstance(part, PromptImage):
                self.units.append(("image", part.key, self.image_tokens))
            else:
                self.units.extend(part)

    @property
    def n_positions(self) -> int:
        """Context positions the prompt fills (tokens plus image embeddings)."""
        return sum(u[2] if isinstance(u, tuple) else 1 for u in self.units)

    @property
    def n_images(self) -> int:
        return sum(isinstance(p, PromptImage) for p in self.parts)

    def flat_ids(self, image_token_id: int) -> list[int]:
        """The ids the HF processor produces: each image as ``image_tokens`` copies of ``image_token_id``."""
        ids: list[int] = []
        for part in self.parts:
            ids.extend([image_token_id] * self.image_tokens if isinstance(part, PromptImage) else part)
        return ids


def split_at_images(text: str) -> list[str]:
    """The texts around the images of a rendered prompt, each image expanded as the HF processor does.

    n_images + 1 texts: all but the last end with ``\\n\\n<start_of_image>``, all but the first start with
    ``<end_of_image>\\n\\n``; each image's positions go between two consecutive texts.
    """
    pieces = text.split(IMAGE_START)
    last = len(pieces) - 1
    return [(IMAGE_END + "\n\n" if index else "") + piece + ("\n\n" + IMAGE_START if index < last else "")
            for index, piece in enumerate(pieces)]


def tokenize_rendered(text: str, images: Sequence[PromptImage], *, tokenize: Tokenize, bos_token: str,
                      bos_id: int, image_tokens: int) -> Prompt:
    """Split the rendered text at ``<start_of_image>``, expand each image as the HF processor does, tokenize."""
    runs = split_at_images(text)
    if len(runs) - 1 != len(images):
        raise UserError(
            f"the prompt holds {len(runs) - 1} {IMAGE_START} markers for {len(images)} images; "
            f"do not write {IMAGE_START} in message text"
        )
    parts: list[list[int] | PromptImage] = []
    for index, run in enumerate(runs):
        ids = tokenize(run)
        if index == 0 and not text.startswith(bos_token):
            ids = [bos_id, *ids]
        parts.append(ids)
        if index < len(images):
            parts.append(images[index])
    return Prompt(parts, text, image_tokens)


def with_thinking(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalized messages whose system prompt starts with ``THINK_SYSTEM_PREFIX`` (added when absent)."""
    if messages[0]["role"] != "system":
        return [{"role": "system", "content": THINK_SYSTEM_PREFIX}, *messages]
    content = messages[0]["content"]
    if isinstance(content, str):
        content = content if content.startswith(THINK_SYSTEM_PREFIX) else f"{THINK_SYSTEM_PREFIX} {content}"
    else:
        first = next((i for i, item in enumerate(content) if item["type"] == "text"), None)
        if first is None:
            content = [{"type": "text", "text": THINK_SYSTEM_PREFIX}, *content]
        elif not content[first]["text"].startswith(THINK_SYSTEM_PREFIX):
            content = list(content)
            content[first] = {"type": "text", "text": f"{THINK_SYSTEM_PREFIX} {content[first]['text']}"}
    return [{"role": "system", "content": content}, *messages[1:]]


def build_prompt(messages: Sequence[Mapping[str, Any]], *, template: str, tokenize: Tokenize, bos_token: str,
                 bos_id: int, image_tokens: int, images: ImageOptions | None,
                 system: str | None = None, add_generation_prompt: bool = True, think: bool = False) -> Prompt:
    """Messages (HF/OpenAI shape) to a ``Prompt``: validate, load images, render the template, tokenize.

    ``think``: start the system prompt with ``THINK_SYSTEM_PREFIX`` (MedGemma 27B then reasons first).
    """
    normalized = normalize_messages(messages, system=system, images=images)
    if think:
        normalized = with_thinking(normalized)
    text = render_template(template, normalized, bos_token=bos_token, add_generation_prompt=add_generation_prompt)
    return tokenize_rendered(text, prompt_images(normalized), tokenize=tokenize, bos_token=bos_token,
                             bos_id=bos_id, image_tokens=image_tokens)
