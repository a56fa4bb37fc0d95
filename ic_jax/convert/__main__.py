"""python -m ic_jax.convert: a Hugging Face DeepSeek-V3.2 or GLM-5 / GLM-5.2 checkpoint -> an ic_jax checkpoint,
and back (--to-hf).

Examples:
  python -m ic_jax.convert --hf ~/models/DeepSeek-V3.2 --out ckpt/v32
  python -m ic_jax.convert --hf ~/models/GLM-5.2 --out ckpt/glm52 --dtype float32
  python -m ic_jax.convert --hf ~/models/GLM-5.2 --out ckpt/glm52 --mesh tensor=8 --distributed  # on every host
  python -m ic_jax.convert --to-hf --ckpt ckpt/v32 --out hf/v32-indexcache --pattern @runs/search/keep0.25.json

FP8 weights are dequantized with their 128 x 128 block scales. The schedule the config declares (indexer_types,
index_topk_pattern, or index_topk_freq + index_skip_topk_offset) becomes the checkpoint's default pattern; layers
that ship no indexer can only run as S. A stopped conversion continues where it was when run again: converted
layers wait in a work folder beside --out (.NAME.convert-work), removed once the checkpoint is written.

With --mesh, the params are placed on the mesh's devices as a model's params are (each process reads from the work
folder only the slices its devices hold) and each process writes its own shards. With --distributed, run the same
command on every host, with --hf, --out and the work folder on a file system they share: the layers are converted by
all processes in turn, and process 0 alone makes and swaps in the checkpoint folder.

--to-hf writes safetensors and config.json in the source architecture's layout (see hf_export.py): the pattern
(default: the checkpoint's) as indexer_types and index_topk_pattern, the S layers without indexer tensors,
weights unquantized; vLLM and SGLang serve the folder as it is.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import jax

from ic_jax.cli import ArgumentParser, add_mesh_arguments, entry
from ic_jax.convert.hf_export import export
from ic_jax.convert.hf_import import convert, saved_tree
from ic_jax.errors import UserError
from ic_jax.files import claim_output_dir
from ic_jax.model.pattern import describe_layout
from ic_jax.runtime.checkpoint import save_params
from ic_jax.runtime.sharding import mesh_from_args
from ic_jax.runtime.tokenizer import find_chat_template, special_tokens


def parse_args(argv):
    p = ArgumentParser(prog="python -m ic_jax.convert", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", type=Path, help="Hugging Face model folder (config.json, *.safetensors) to convert")
    p.add_argument("--to-hf", action="store_true", help="export --ckpt as a Hugging Face folder instead")
    p.add_argument("--ckpt", type=Path, help="with --to-hf: the ic_jax checkpoint to export")
    p.add_argument("--pattern", help="with --to-hf: the pattern to ship (default: the checkpoint's, else all F)")
    p.add_argument("--out", type=Path, required=True, help="folder to write (ic_jax checkpoint, or Hugging Face "
                                                            "folder with --to-hf)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="parameter dtype (default: float32 for an fp32 checkpoint, else bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_mesh_arguments(p)
    return p.parse_args(argv)


def work_dir(out: Path) -> Path:
    return out.absolute().parent / f".{out.name}.convert-work"


@entry
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.to_hf:
        if args.mesh or args.distributed:
            raise UserError("--mesh and --distributed go with --hf (a conversion); drop them with --to-hf")
        return export_main(args)
    if args.ckpt is not None or args.pattern is not None:
        raise UserError("--ckpt and --pattern go with --to-hf; pass --to-hf to export, or --hf alone to convert")
    if args.hf is None:
        raise UserError("pass --hf DIR to convert a Hugging Face folder, or --to-hf --ckpt DIR to export one")
    if not (args.hf / "config.json").is_file():
        raise UserError(f"--hf {args.hf} has no config.json; pass a Hugging Face model folder")
    out = claim_output_dir(args.out, "--out", overwrite=args.overwrite)
    mesh = mesh_from_args(args)
    work = work_dir(out)
    p = convert(args.hf, work, args.dtype, progress=not args.quiet and jax.process_index() == 0)
    tokenizer = args.hf / "tokenizer.json"
    meta = {"converted_from": str(args.hf.absolute()), "architecture": p.info.architecture, "notes": p.notes,
            "indexers_shipped": p.shipped, "hf_config": p.info.raw, "special_tokens": special_tokens(args.hf)}
    chat = find_chat_template(args.hf)
    if chat is not None:  # generate --chat reads it from meta.json
        meta["chat_template"] = chat[0]
    save_params(out, p.info.cfg, saved_tree(p, work), mesh=mesh, pattern=p.pattern if "S" in p.pattern else None,
                tokenizer_file=tokenizer if tokenizer.is_file() else None, meta=meta, overwrite=True)
    if jax.process_index() == 0:  # every process has written its shards: save_params ends at a barrier
        shutil.rmtree(work, ignore_errors=True)
    for note in p.notes:
        print(f"note: {note}")
    cfg = p.info.cfg
    print(describe_layout(p.pattern, [cfg.is_moe(i) for i in range(cfg.num_hidden_layers)]))
    print(f"wrote {out}")
    return 0


def export_main(args) -> int:
    if args.hf is not None or args.ckpt is None:
        raise UserError("--to-hf exports --ckpt DIR (an ic_jax checkpoint); --hf is for the other direction")
    arch, pattern = export(args.ckpt, args.out, args.pattern, overwrite=args.overwrite)
    print(f"wrote {args.out} ({arch}, pattern {pattern})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
