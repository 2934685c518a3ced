"""Write timm's ViT-Tiny (the shared weights) as a transformers folder: ``ViTForImageClassification``
weights (``vit_from_timm``) and its preprocessing as an image processor (``image_processor_from_timm``),
ready for ``--model hf:OUT``.

    python benchmarks/hf_convert_vit_tiny.py --weights ../shared/weights/vit_tiny_...safetensors --out vit-tiny-hf
"""
from __future__ import annotations

import argparse

from tokensparse.families.hf_convert import image_processor_from_timm, vit_from_timm
from tokensparse.models import create_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="the timm ViT-Tiny weights file")
    p.add_argument("--model", default="vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    p.add_argument("--out", required=True, help="folder to write")
    args = p.parse_args()
    timm_model = create_model(args.model, weights=args.weights)
    vit_from_timm(timm_model).save_pretrained(args.out)
    image_processor_from_timm(timm_model).save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
