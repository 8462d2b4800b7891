"""`python -m spap.models [--markdown]`: list the supported families (the README's list is
this command's `--markdown` output)."""

from __future__ import annotations

import argparse

from . import FAMILIES, WRAPPERS, markdown


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m spap.models", description=__doc__)
    ap.add_argument("--markdown", action="store_true", help="the README's paragraph")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
        return
    for model_type, fam in sorted(FAMILIES.items()):
        print(f"{model_type:18} {fam.formula().replace('`', '')}  [{fam.width_key}]")
    for model_type, path in sorted(WRAPPERS.items()):
        print(f"{model_type:18} multimodal: the language model in {path}")


if __name__ == "__main__":
    main()
