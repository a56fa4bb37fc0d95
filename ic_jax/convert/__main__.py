"""python -m ic_jax.convert: a Hugging Face DeepSeek-V3.2 or GLM-5 / GLM-5.2 checkpoint -> an ic_jax checkpoint.

Examples:
  python -m ic_jax.convert --hf ~/models/DeepSeek-V3.2 --out ckpt/v32
  python -m ic_jax.convert --hf ~/models/GLM-5.2 --out ckpt/glm52 --dtype float32

FP8 weights are dequantized with their 128 x 128 block scales. The schedule the config declares (indexer_types,
index_topk_pattern, or index_topk_freq + index_skip_topk_offset) becomes the checkpoint's default pattern; layers
that ship no indexer can only run as S. A stopped conversion continues where it was when run again: converted
layers wait in a work folder beside --out (.NAME.convert-work), removed once the checkpoint is written.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ic_jax.cli import ArgumentParser, entry
from ic_jax.convert.hf_import import convert
from ic_jax.errors import UserError
from ic_jax.files import claim_output_dir
from ic_jax.model.dsa import build_model
from ic_jax.model.pattern import describe_layout
from ic_jax.runtime.checkpoint import save_checkpoint


def parse_args(argv):
    p = ArgumentParser(prog="python -m ic_jax.convert", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", type=Path, required=True, help="Hugging Face model folder (config.json, *.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="ic_jax checkpoint folder to write")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="parameter dtype (default: float32 for an fp32 checkpoint, else bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def work_dir(out: Path) -> Path:
    return out.absolute().parent / f".{out.name}.convert-work"


@entry
def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.hf / "config.json").is_file():
        raise UserError(f"--hf {args.hf} has no config.json; pass a Hugging Face model folder")
    out = claim_output_dir(args.out, "--out", overwrite=args.overwrite)
    work = work_dir(out)
    info, layers, top, pattern, notes = convert(args.hf, work, args.dtype, progress=not args.quiet)
    shipped = "".join("F" if "indexer" in lp else "S" for lp in layers)  # every indexer the checkpoint has is kept
    model = build_model(info.cfg, shipped, layers, top)
    tokenizer = args.hf / "tokenizer.json"
    meta = {"converted_from": str(args.hf.absolute()), "architecture": info.architecture, "notes": notes,
            "indexers_shipped": shipped}
    save_checkpoint(out, model, pattern=pattern if "S" in pattern else None,
                    tokenizer_file=tokenizer if tokenizer.is_file() else None, meta=meta, overwrite=True)
    shutil.rmtree(work, ignore_errors=True)
    for note in notes:
        print(f"note: {note}")
    print(describe_layout(pattern, [info.cfg.is_moe(i) for i in range(info.cfg.num_hidden_layers)]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
