"""Initial objectness loss with and without the prior-probability init, on one real batch.

    FL_RPN_DATA=/path/to/data python experiments/prior_init/measure.py [--model r50_fpn] [--images 2]

Builds each focal RPN form twice (``rpn.prior_prob=0.01`` and ``null``, same seed, same weights otherwise),
runs one forward pass in training mode on the first images of COCO128 and prints ``loss_objectness``.
"""

import argparse

import torch

from fl_rpn import build_model
from fl_rpn.config import compose_config
from fl_rpn.data import build_dataset, collate_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="r50_fpn")
    parser.add_argument("--images", type=int, default=2)
    args = parser.parse_args()
    base = compose_config(["dataset=coco128", f"model={args.model}"])
    dataset = build_dataset(base.dataset.train, train=True, hflip_prob=0.0)
    images, targets = collate_fn([dataset[i] for i in range(args.images)])
    header = "| form | prior_prob | loss_objectness | mean initial object probability |"
    print(f"{header}  ({args.model}, {args.images} images)")
    print("|---|---|---|---|")
    for form in ("sigmoid", "softmax"):
        for prior in ("0.01", "null"):
            torch.manual_seed(0)
            cfg = compose_config(
                ["dataset=coco128", f"model={args.model}", f"rpn=focal_{form}", f"rpn.prior_prob={prior}"]
            )
            model = build_model(cfg, num_classes=dataset.meta.num_classes).train()
            captured = {}
            hook = model.rpn.head.register_forward_hook(lambda m, i, o, store=captured: store.update(maps=o[0]))
            with torch.no_grad():
                losses = model(list(images), list(targets))
            hook.remove()
            probs = []
            for level in captured["maps"]:
                if form == "softmax":
                    n, c, h, w = level.shape
                    level = level.view(n, c // 2, 2, h, w)
                    probs.append(torch.sigmoid(level[:, :, 1] - level[:, :, 0]).flatten())
                else:
                    probs.append(torch.sigmoid(level).flatten())
            p = torch.cat(probs).mean().item()
            print(f"| {form} | {prior} | {losses['loss_objectness'].item():.4f} | {p:.4f} |")


if __name__ == "__main__":
    main()
