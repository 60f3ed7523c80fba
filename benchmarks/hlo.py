"""Reading XLA's optimized HLO text: instructions, computations, and what runs how often per step.

The benchmarks that count what a compiled program does (sharding_report.py: its
collectives; gemm_bound.py: its matmuls) walk the same text with these parsers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator

_DTYPE_BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
               "f16": 16, "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
               "c64": 64, "c128": 128, "token": 0}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_ARRAY = re.compile(r"^([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def dtype_bits(name: str) -> int:
    if name in _DTYPE_BITS:
        return _DTYPE_BITS[name]
    if name.startswith("f8"):
        return 8
    if name.startswith(("f4", "f6")):
        return int(name[1])
    raise ValueError(f"unknown HLO element type {name!r}")


def shape_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO type (`f32[4,8]{1,0}`, or a tuple of them)."""
    total = 0
    for dtype, dims in _SHAPE.findall(type_text):
        elements = math.prod(int(d) for d in dims.split(",") if d)
        total += elements * dtype_bits(dtype) // 8
    return total


def attribute_dims(attributes: str, key: str) -> tuple[int, ...]:
    """The dimension list of an attribute such as `lhs_contracting_dims={1}`; () when absent."""
    match = re.search(rf"\b{key}=\{{([0-9,]*)\}}", attributes)
    return tuple(int(d) for d in match.group(1).split(",") if d) if match else ()


def array_type(type_text: str) -> tuple[str, tuple[int, ...]]:
    """(element type, shape) of an array type such as `f32[4,8]{1,0}`."""
    match = _ARRAY.match(type_text)
    return match.group(1), tuple(int(d) for d in match.group(2).split(",") if d)


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at `start`."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i
    raise ValueError(f"unbalanced brackets in HLO line: {text[:200]}")


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for c in text:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    if "".join(current).strip():
        parts.append("".join(current))
    return [p.strip() for p in parts]


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    type_text: str
    opcode: str
    operands: list[str]
    attributes: str


def parse_instruction(line: str) -> Instruction | None:
    match = _INSTRUCTION.match(re.sub(r"/\*.*?\*/", "", line))
    if not match:
        return None
    name, rest = match.groups()
    if rest.startswith("("):
        end = _closing(rest, 0)
        type_text, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    end = _closing(rest, op.end() - 1)
    return Instruction(name, type_text, op.group(1), _split_top_level(rest[op.end():end]), rest[end + 1:])


def parse_computations(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Instructions of each computation, and the name of the entry computation."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            header = re.match(r"(ENTRY\s+)?%?([\w.\-]+)", line)
            if header and header.group(2) != "HloModule":
                current = header.group(2)
                computations[current] = []
                if header.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
        elif current is not None:
            instruction = parse_instruction(line)
            if instruction:
                computations[current].append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def replica_group_size(attributes: str, num_devices: int) -> int:
    """Devices per replica group, from any of XLA's three spellings of `replica_groups`."""
    match = re.search(r"replica_groups=", attributes)
    if not match:
        return num_devices
    text = attributes[match.end():]
    if text.startswith("mesh["):
        # mesh['axis_0'=4,'axis_1'=2][, device_ids=(...)] {'axis_0'}: the product of the named axes
        end = _closing(text, 4)
        axes = {name: int(size) for name, size in re.findall(r"'(\w+)'=(\d+)", text[:end])}
        chosen = re.search(r"\{([^}]*)\}", text[end:]).group(1)
        return math.prod(int(sub) if sub else axes[name]
                         for name, sub in re.findall(r"'(\w+)'(?::\(\d+\)(\d+))?", chosen))
    if text.startswith("["):  # iota: [groups,size]<=[...]
        return int(text[1:text.index("]")].split(",")[-1])
    groups = text[:_closing(text, 0) + 1]
    first = re.match(r"\{\{([\d,\s]*)\}", groups)
    return len(first.group(1).split(",")) if first else num_devices  # `{}`: one group of all devices


def operand_bytes(operand: str, types: dict[str, str]) -> int:
    """Bytes of an instruction's operand, by name (`types`: its computation's values) or by its printed type."""
    if _SHAPE.search(operand):  # older HLO text prints each operand's type
        return shape_bytes(operand.rsplit("%", 1)[0])
    return shape_bytes(types[operand.lstrip("%")])


def _calls(instruction: Instruction) -> Iterator[tuple[str, int]]:
    """(called computation, times it runs per execution of the instruction)."""
    trips = _TRIP_COUNT.search(instruction.attributes)
    times = int(trips.group(1)) if trips and instruction.opcode == "while" else 1
    for name in _CALLED.findall(instruction.attributes):
        yield name, times
    for group in _CALLED_LIST.findall(instruction.attributes):
        for name in group.split(","):
            yield name.strip().lstrip("%"), times


def walk_instructions(hlo_text: str) -> Iterator[tuple[Instruction, str, dict[str, str], int, bool]]:
    """Every instruction reachable from the entry computation, fusions, calls and loop bodies included.

    Yields (instruction, its computation's name, the types of that computation's values
    by name, executions per step, whether an enclosing loop has no known trip count).
    Every branch of a conditional counts as taken.
    """
    computations, entry = parse_computations(hlo_text)

    def walk(name: str, times: int, in_unknown_loop: bool):
        instructions = computations[name]
        types = {i.name: i.type_text for i in instructions}
        for instruction in instructions:
            yield instruction, name, types, times, in_unknown_loop
            if instruction.opcode in ("async-update", "async-done"):
                continue  # they name the computation their async-start already ran
            unknown = instruction.opcode == "while" and not _TRIP_COUNT.search(instruction.attributes)
            for called, factor in _calls(instruction):
                yield from walk(called, times * factor, in_unknown_loop or unknown)

    yield from walk(entry, 1, False)
