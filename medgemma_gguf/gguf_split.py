"""Writing GGUF models in llama.cpp's split format, so files stay under the Hub's 50 GB per-file limit.

The format is llama.cpp's (``gguf-split``, ``convert_hf_to_gguf.py --split-max-size``), written with gguf-py's
own writer: parts named ``NAME-00001-of-0000N.gguf`` … beside where ``NAME.gguf`` would be, every part with
``split.no`` (0-based), ``split.count`` and ``split.tensors.count``, the first part with all the other
metadata; tensors keep their order and are never cut. llama.cpp (and ``medgemma_gguf.gguf_info``) loads
such a model from its first part. A part holds at most ``max_bytes`` of tensor data (plus the header).

When: ``split_size(file_bytes, requested)`` — the default splits files over ``SPLIT_DEFAULT_ABOVE`` (49 GB:
the 27B model in BF16 is about 54 GB) into parts of at most ``SPLIT_DEFAULT_MAX`` (45 GB);
``--split-max-size SIZE`` splits anything bigger than SIZE, ``--split-max-size 0`` never splits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf

from medgemma_gguf.atomic import StagedOutputs
from medgemma_gguf.errors import InputError, UserError, setting
from medgemma_gguf.gguf_info import SPLIT_NAME, read_gguf_info, split_part_name
from medgemma_gguf.sizes import parse_size

SPLIT_DEFAULT_ABOVE = 49 * 10**9
SPLIT_DEFAULT_MAX = 45 * 10**9


def parse_split_size(text: str | int | None) -> int | None:
    """``--split-max-size``: None (the default rule), 0 (never split) or bytes ("45GB": decimal, as the Hub's
    limit and llama.cpp's gguf-split count)."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InputError(f"{setting('split_max_size')} must be 0 (no split) or a size, got {text}")
        return text
    if str(text).strip() in ("0", "none"):
        return 0
    return parse_size(str(text), setting("split_max_size"))


def split_size(file_bytes: int, requested: int | None) -> int:
    """The part size to split a file of ``file_bytes`` into (0: keep it whole); see the module docstring."""
    if requested is None:
        return SPLIT_DEFAULT_MAX if file_bytes > SPLIT_DEFAULT_ABOVE else 0
    return requested if requested and file_bytes > requested else 0


def same_model_file(path: str, name: str) -> bool:
    """Whether ``path`` is ``name`` (``NAME.gguf``) or one of the parts ``NAME-0000i-of-0000N.gguf`` of it."""
    file = Path(path).name
    match = SPLIT_NAME.match(file)
    return file == name or (match is not None and match.group("prefix") == name.removesuffix(".gguf"))


def part_paths(final: Path, count: int) -> list[Path]:
    """The parts' paths of a model that would be ``final`` (``NAME.gguf``) as one file."""
    stem = final.name.removesuffix(".gguf")
    return [final.with_name(split_part_name(stem, i, count)) for i in range(1, count + 1)]


class SplitWriter(gguf.GGUFWriter):
    """gguf-py's writer whose parts are written at paths the caller chooses (temporary names that are
    renamed when every part is complete): ``name_parts(count)`` returns them once the split is planned."""

    def __init__(self, arch: str, name_parts: Callable[[int], Sequence[Path]], split_max_size: int):
        super().__init__(path=None, arch=arch, split_max_size=split_max_size)
        self._name_parts = name_parts

    def format_shard_names(self, path: Path) -> list[Path]:
        return [Path(p) for p in self._name_parts(len(self.tensors))]


def split_gguf(source: Path, max_bytes: int, *, force: bool = False,
               progress: Callable[[int], Any] | None = None) -> list[Path]:
    """Rewrite the GGUF ``source`` as llama.cpp split parts of at most ``max_bytes`` of tensor data each, beside
    it, and remove ``source``; the parts appear together or not at all. Returns the parts' paths. A file
    whose tensors fit in one part is left as it is (``[source]``)."""
    source = Path(source)
    info = read_gguf_info(source)
    if len(info.parts) > 1:
        raise UserError(f"{source} is already split into {len(info.parts)} parts")
    if max_bytes <= 0 or info.total_tensor_bytes <= max_bytes:
        return [source]
    reader = gguf.GGUFReader(source)
    staged_paths: list[Path] = []
    with StagedOutputs(force=force) as staged:
        def name_parts(count: int) -> list[Path]:
            finals = part_paths(source, count)
            staged_paths[:] = finals
            return [staged.stage(final) for final in finals]

        writer = SplitWriter(info.architecture or "unknown", name_parts, max_bytes)
        alignment = info.metadata.get("general.alignment")
        if alignment:
            writer.data_alignment = int(alignment)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by the writer itself / virtual
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        for tensor in reader.tensors:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   tensor.tensor_type)
        writer.write_header_to_file(path=source)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
            if progress is not None:
                progress(int(tensor.n_bytes))
        writer.close()
        del reader
        staged.commit()
    source.unlink()
    return staged_paths
