"""What a trained RPN head scores: its object probabilities over every anchor of a few images, and whether any of
its tower's ReLU channels are dead. Used to look at the runs whose objectness loss collapsed.

Per run folder (holding ``last.pt`` and ``.hydra/overrides.yaml``): the largest object probability over all
anchors of the first ``--limit`` images (sorted by name) of ``--images``, its 99.99th percentile, the anchors above
0.5, and the channels of the head's tower (``cls_tower`` of the decoupled head, ``conv`` of the shared ones) that
are zero at every position of every image. The model runs in eval mode, so images go through its own transform.

    python experiments/decoupled_head/objectness_scores.py --images data/bccd/JPEGImages multirun/x/22 multirun/x/4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from torchvision.io import ImageReadMode, read_image

from fl_rpn.engine.checkpoint import model_from_checkpoint
from fl_rpn.modeling.losses import objectness_probability


def head_scores(run_dir: Path, images: list[torch.Tensor]) -> dict[str, float | int | str]:
    """The scores of the run's ``last.pt`` on ``images`` (``[3, H, W]`` floats in [0, 1]), as the table prints them."""
    model, _ = model_from_checkpoint(run_dir / "last.pt")
    model.eval()
    head = model.rpn.head
    tower = head.cls_tower if hasattr(head, "cls_tower") else head.conv
    activations, logits = [], []
    hooks = [tower.register_forward_hook(lambda m, i, out: activations.append(out)),
             head.cls_logits.register_forward_hook(lambda m, i, out: logits.append(out))]  # fmt: skip
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    num_anchors = head.bbox_pred.out_channels // 4
    # cls_logits [N, K A, H, W], anchor-major (a0: bg, a0: obj, a1: bg, ... for K = 2) -> [N H W A, K]
    per_anchor = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, z.shape[1] // num_anchors) for z in logits])
    p = objectness_probability(per_anchor)
    active = torch.stack([(a > 0).any(dim=(0, 2, 3)) for a in activations]).any(dim=0)
    overrides = dict(o.split("=", 1) for o in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()))
    arm = " ".join(f"{k}={overrides.get(k, '-')}" for k in ("rpn", "rpn.head.kind", "seed"))
    return {"run": run_dir.name, "arm": arm, "max": p.max().item(), "p99.99": torch.quantile(p, 0.9999).item(),
            "above_half": int((p > 0.5).sum()), "dead": f"{int((~active).sum())}/{active.numel()}"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with last.pt and .hydra/overrides.yaml")
    parser.add_argument("--images", type=Path, required=True, help="a folder of images (jpg or png)")
    parser.add_argument("--limit", type=int, default=8, help="the first LIMIT images by name")
    args = parser.parse_args()
    files = sorted(f for f in args.images.iterdir() if f.suffix.lower() in {".jpg", ".jpeg", ".png"})[: args.limit]
    if not files:
        raise SystemExit(f"--images {args.images}: no .jpg/.png files")
    images = [read_image(str(f), ImageReadMode.RGB).float() / 255 for f in files]
    print(f"{len(files)} images of {args.images} ({files[0].name} .. {files[-1].name})\n")
    print("| run | arm | max p_obj | 99.99th pct | anchors > 0.5 | tower channels never active |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        s = head_scores(run, images)
        print(f"| {s['run']} | {s['arm']} | {s['max']:.3f} | {s['p99.99']:.3f} | {s['above_half']} | {s['dead']} |")


if __name__ == "__main__":
    main()
