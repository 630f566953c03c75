"""``fl-rpn-predict``: draw a checkpoint's detections (and top-k RPN proposals, and the ground truth) on images.

Each drawing gets a caption strip under it, and each image a printed line, with the number of detections at or
above ``score_thresh`` and, when there are none, the best score below it (``0 detections >= 0.5; best 0.35``).
"""

import sys
from collections import Counter
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torchvision.io import write_png
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes

from ..config import CONF_DIR
from ..data.dataset import read_image
from ..data.yolo import IMAGE_SUFFIXES
from ..engine.checkpoint import model_from_checkpoint
from ..engine.evaluate import predict, select_device
from ..errors import report_errors
from .eval import describe_val, use_checkpoint_data
from .preflight import preflight


def image_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"inputs: {path} is neither an image file nor a directory")
    if not files:
        raise ValueError(f"inputs: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {list(inputs)}")
    return files


def output_names(files: list[Path]) -> list[str]:
    """``<stem>.png`` per input; inputs sharing a stem (``a/x.jpg``, ``b/x.jpg``) add their position: ``x-0.png``."""
    counts = Counter(f.stem for f in files)
    return [f"{f.stem}-{i}.png" if counts[f.stem] > 1 else f"{f.stem}.png" for i, f in enumerate(files)]


# one colour per class (matplotlib's tab10), label k drawn with PALETTE[(k - 1) % 10]
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def drawing_sizes(image: torch.Tensor) -> tuple[int, int]:
    """``(line width, font size)`` in pixels for a ``[3, H, W]`` image: 2 and 16 at 640 px, scaling with the
    shorter side (at least 1 and 10)."""
    side = min(image.shape[1:])
    return max(1, round(side / 320)), max(10, round(side / 40))


def _font() -> str:
    """A TrueType font that ships with matplotlib (PIL's default bitmap font cannot be scaled)."""
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


def draw_boxes(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """``image`` uint8 ``[3, H, W]`` with ``boxes`` ``[M, 4]`` xyxy in the colour of their class ``labels`` ``[M]``
    (1..K), each with its text on a filled label of the same colour."""
    if not len(boxes):  # draw_bounding_boxes warns on an empty box list
        return image
    width, font_size = drawing_sizes(image)
    colors = [PALETTE[(int(c) - 1) % len(PALETTE)] for c in labels]
    return draw_bounding_boxes(
        image, boxes, labels=texts, colors=colors, width=width, font=_font(), font_size=font_size,
        fill_labels=True, label_colors="white",
    )  # fmt: skip


def draw(
    image: torch.Tensor, output: dict, class_names: list[str], score_thresh: float, proposals_topk: int
) -> torch.Tensor:
    """``image`` uint8 ``[3, H, W]`` with proposals (thin, grey) under detections (one colour per class, labelled
    with class and score)."""
    if proposals_topk > 0 and len(output["proposals"]):
        image = draw_bounding_boxes(image, output["proposals"][:proposals_topk], colors="gray", width=1)
    keep = output["scores"] >= score_thresh
    labels, scores = output["labels"][keep], output["scores"][keep]
    texts = [f"{class_names[int(c) - 1]} {s:.2f}" for c, s in zip(labels, scores)]
    return draw_boxes(image, output["boxes"][keep], labels, texts)


def detection_summary(scores: torch.Tensor, score_thresh: float, box_score_thresh: float) -> str:
    """``"3 detections >= 0.5"``; with none, the best of the ``[D]`` ``scores`` below it, ``"0 detections >= 0.5;
    best 0.35"``, or that the model kept none (every box scored at most its ``box_score_thresh``)."""
    count = int((scores >= score_thresh).sum())
    text = f"{count} detection{'' if count == 1 else 's'} >= {score_thresh:g}"
    if count:
        return text
    if not len(scores):
        return f"{text}; none above the model's box_score_thresh {box_score_thresh:g}"
    return f"{text}; best {int(scores.max() * 100) / 100:.2f}"  # rounded down: 0.499 is not shown as 0.50


def add_caption(image: torch.Tensor, lines: list[str]) -> torch.Tensor:
    """``image`` uint8 ``[3, H, W]`` over a white strip ``[3, h, W]`` with ``lines`` in black, one a row, in the
    label font size (smaller if a line would not fit the width)."""
    from PIL import Image, ImageDraw, ImageFont

    width = image.shape[2]
    size = drawing_sizes(image)[1]
    longest = max(ImageFont.truetype(_font(), size).getlength(line) for line in lines)
    size = max(6, min(size, int(size * (width - 4) / longest)))
    font, row = ImageFont.truetype(_font(), size), round(1.25 * size)
    strip = Image.new("RGB", (width, row * len(lines) + 4), "white")
    pen = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        pen.text((2, 2 + i * row), line, fill="black", font=font)
    return torch.cat([image, pil_to_tensor(strip)], dim=1)


def draw_ground_truth(image: torch.Tensor, target: dict, class_names: list[str]) -> torch.Tensor:
    """``image`` with the ground-truth ``boxes`` and ``labels`` of ``target`` (ignored ones marked ``(ignored)``)."""
    ignore = target.get("ignore", torch.zeros(len(target["labels"]), dtype=torch.bool))
    texts = [class_names[int(c) - 1] + (" (ignored)" if i else "") for c, i in zip(target["labels"], ignore)]
    return draw_boxes(image, target["boxes"], target["labels"], texts)


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 8) -> torch.Tensor:
    """Two ``[3, H, W]`` uint8 images next to each other, a white ``gap`` between them."""
    space = torch.full((3, left.shape[1], gap), 255, dtype=left.dtype)
    return torch.cat([left, space, right], dim=2)


def ground_truth_by_file(cfg: DictConfig) -> dict[Path, dict]:
    """``dataset.val``'s ground truth per resolved image path: ``{"boxes": [M, 4], "labels": [M], "ignore": [M]}``."""
    from ..data import build_dataset

    records = build_dataset(cfg.dataset.val, train=False).records
    return {
        r.file.resolve(): {
            "boxes": torch.as_tensor(r.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(r.labels, dtype=torch.int64),
            "ignore": torch.as_tensor(r.ignore, dtype=torch.bool),
        }
        for r in records
    }  # fmt: skip


def predict_images(cfg: DictConfig, overrides: list[str] | None = None) -> list[Path]:
    """Draw every input; an input that cannot be read is reported and skipped, and after the others are drawn a
    ``ValueError`` lists every such input. With ``ground_truth=true`` an input of ``dataset.val`` (matched by path)
    gets its ground truth drawn on the left and the predictions on the right; ``dataset`` is the checkpoint's own
    unless ``overrides`` (default: the command line's) choose it (``fl_rpn.cli.eval.use_checkpoint_data``)."""
    device = select_device(cfg.device)
    model, ckpt = model_from_checkpoint(cfg.checkpoint)
    model.to(device)
    class_names = ckpt["meta"]["class_names"]
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ground_truth = {}
    if cfg.ground_truth:
        data_from, _ = use_checkpoint_data(cfg, ckpt, overrides)
        ground_truth = ground_truth_by_file(cfg)
        print(f"ground truth from dataset.val: {describe_val(cfg.dataset)}, {len(ground_truth)} images ({data_from})")
    written, unreadable = [], []
    files = image_files(list(cfg.inputs))
    for file, name in zip(files, output_names(files)):
        try:
            image = read_image(file)  # the datasets' reader: BMP and TIFF through PIL
        except (ValueError, OSError) as e:
            unreadable.append(f"{file}: {e}")
            print(f"{file}: cannot be read, skipped ({e})", file=sys.stderr)
            continue
        (output,) = predict(model, [image.to(device).float() / 255])
        output = {k: v.cpu() for k, v in output.items()}
        drawing = draw(image, output, class_names, cfg.score_thresh, cfg.proposals_topk)
        summary = detection_summary(output["scores"], cfg.score_thresh, model.roi_heads.score_thresh)
        caption = [summary]
        if cfg.proposals_topk > 0 and len(output["proposals"]):
            caption.append(f"grey: top-{min(cfg.proposals_topk, len(output['proposals']))} RPN proposals")
        note = ""
        if cfg.ground_truth:
            target = ground_truth.get(file.resolve())
            if target is None:
                note = f" (not in dataset.val {cfg.dataset.name}: no ground truth drawn)"
            else:
                drawing = side_by_side(draw_ground_truth(image, target, class_names), drawing)
                note = f", {len(target['boxes'])} ground-truth boxes on the left"
                caption.append(f"left: ground truth ({len(target['boxes'])} boxes)")
        if cfg.caption:
            drawing = add_caption(drawing, caption)
        path = out_dir / name
        write_png(drawing, str(path))
        written.append(path)
        print(f"{file} -> {path}: {summary}{note}")
    if unreadable:
        raise ValueError(
            f"inputs: {len(unreadable)} of {len(files)} images could not be read (the other {len(written)} were "
            f"drawn in {out_dir}):\n  " + "\n  ".join(unreadable)
        )
    return written


@hydra.main(config_path=str(CONF_DIR), config_name="predict", version_base=None)
@report_errors
def predict_app(cfg: DictConfig) -> None:
    predict_images(cfg)


def main() -> None:
    preflight(
        "fl-rpn-predict", "predict",
        "draw a checkpoint's detections (score >= score_thresh), optionally its top-k RPN proposals (grey) and the "
        "ground truth, on images; prints per image how many detections passed the threshold and the best score",
        examples=["fl-rpn-predict checkpoint=RUN/last.pt inputs=[photo.jpg,folder/] proposals_topk=20",
                  "fl-rpn-predict checkpoint=RUN/last.pt inputs=[DIR/JPEGImages] ground_truth=true score_thresh=0.3"],
        groups=[],
    )  # fmt: skip
    predict_app()


if __name__ == "__main__":
    main()
