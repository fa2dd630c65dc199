"""Prints the C++ initializers of the nf4 ("normal" levels) codebook for csrc/include/unlearn/codecs.h
(UE_NORMAL4_LEVELS and UE_NORMAL4_MIDPOINTS) from the one formula in unlearn_ext/reference/codecs.py.

    python scripts/gen_codebooks.py

Nine significant digits round-trip every float32 exactly; tests/test_history_codebooks.py checks the
compiled tables against the formula (every level decodes to itself, midpoints go to the lower level).
"""
from unlearn_ext.reference.codecs import normal4_levels, normal4_midpoints


def literal(v) -> str:
    text = f"{float(v):.9g}"
    return text + ("f" if any(c in text for c in ".e") else ".0f")  # "1f" is not a C++ literal


def initializer(values) -> str:
    return "{" + ", ".join(literal(v) for v in values) + "}"


if __name__ == "__main__":
    print("#define UE_NORMAL4_LEVELS", initializer(normal4_levels()))
    print("#define UE_NORMAL4_MIDPOINTS", initializer(normal4_midpoints()))
