"""``fl-rpn-predict``: draw a checkpoint's detections (and top-k RPN proposals) on images, save PNGs."""

from collections import Counter
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes

from .config import CONF_DIR
from .data.dataset import read_image
from .data.yolo import IMAGE_SUFFIXES
from .engine.checkpoint import model_from_checkpoint
from .engine.evaluate import predict
from .engine.trainer import select_device
from .errors import report_errors


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


def draw(
    image: torch.Tensor, output: dict, class_names: list[str], score_thresh: float, proposals_topk: int
) -> torch.Tensor:
    """``image`` uint8 ``[3, H, W]`` with proposals (thin, grey) under detections (labelled, coloured)."""
    if proposals_topk > 0 and len(output["proposals"]):
        image = draw_bounding_boxes(image, output["proposals"][:proposals_topk], colors="gray", width=1)
    keep = output["scores"] >= score_thresh
    if not keep.any():  # draw_bounding_boxes warns on an empty box list
        return image
    labels = [f"{class_names[int(c) - 1]} {s:.2f}" for c, s in zip(output["labels"][keep], output["scores"][keep])]
    return draw_bounding_boxes(image, output["boxes"][keep], labels=labels, colors="red", width=2)


def predict_images(cfg: DictConfig) -> list[Path]:
    device = select_device(cfg.device)
    model, ckpt = model_from_checkpoint(cfg.checkpoint)
    model.to(device)
    class_names = ckpt["meta"]["class_names"]
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    files = image_files(list(cfg.inputs))
    for file, name in zip(files, output_names(files)):
        image = read_image(file)  # the datasets' reader: BMP and TIFF through PIL
        (output,) = predict(model, [image.to(device).float() / 255])
        path = out_dir / name
        write_png(draw(image, output, class_names, cfg.score_thresh, cfg.proposals_topk), str(path))
        written.append(path)
        print(f"{file} -> {path}: {int((output['scores'] >= cfg.score_thresh).sum())} detections")
    return written


@hydra.main(config_path=str(CONF_DIR), config_name="predict", version_base=None)
@report_errors
def main(cfg: DictConfig) -> None:
    predict_images(cfg)


if __name__ == "__main__":
    main()
