import numpy as np
import pytest
import torch
from torchvision.io import write_png

from fl_rpn.data import DatasetMeta, DetectionDataset, ImageRecord, build_transforms, read_coco


def test_train_target_drops_ignored_boxes(coco_files):
    records, meta, _ = read_coco(*coco_files)
    ds = DetectionDataset(records, meta, transforms=build_transforms(train=False), train=True)
    assert len(ds) == 3 and ds.meta is meta and ds.records is records
    image, target = ds[2]  # a.png: three boxes, the crowd one ignored
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, 128 / 255))
    assert set(target) == {"boxes", "labels", "image_id"}
    assert target["image_id"] == 7
    assert type(target["boxes"]) is torch.Tensor
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [35, 25, 40, 30]]))
    torch.testing.assert_close(target["labels"], torch.tensor([1, 2]))


def test_eval_target_keeps_everything(coco_files):
    records, meta, _ = read_coco(*coco_files)
    ds = DetectionDataset(records, meta, transforms=build_transforms(train=False), train=False)
    _, target = ds[2]
    assert target["orig_size"] == (30, 40)
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [0, 0, 20, 20], [35, 25, 40, 30]]))
    torch.testing.assert_close(target["labels"], torch.tensor([1, 3, 2]))
    torch.testing.assert_close(target["ignore"], torch.tensor([False, True, False]))
    torch.testing.assert_close(target["area"], torch.tensor([40.5, 123.0, 100.0]))

    image, empty = ds[0]
    assert image.shape == (3, 16, 16)
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == torch.float32
    assert empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64
    assert empty["ignore"].shape == (0,) and empty["area"].shape == (0,)


def test_box_area_when_no_coco_area_and_no_transforms(tmp_path, image_writer):
    image_writer(tmp_path / "x.png", 10, 8, value=255)
    record = ImageRecord(
        tmp_path / "x.png", 0, 10, 8, np.array([[1, 1, 4, 5]], np.float32), np.array([1]), np.array([False])
    )
    ds = DetectionDataset([record], DatasetMeta(["a"], [1]), train=False)
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.max() == 1.0
    torch.testing.assert_close(target["area"], torch.tensor([12.0]))
    assert ds.aspect_ratios() == [1.25]


def test_horizontal_flip_moves_boxes_with_pixels(tmp_path):
    pixels = torch.zeros(3, 50, 100, dtype=torch.uint8)
    pixels[:, 20:40, 10:30] = 255  # the object under box [10, 20, 30, 40]
    write_png(pixels, str(tmp_path / "x.png"))
    record = ImageRecord(
        tmp_path / "x.png", 0, 100, 50, np.array([[10, 20, 30, 40]], np.float32), np.array([1]), np.array([False])
    )
    meta = DatasetMeta(["a"], [1])

    image, target = DetectionDataset([record], meta, build_transforms(True, hflip_prob=1.0))[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[70.0, 20, 90, 40]]))
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0])
    assert (image[:, y1:y2, x1:x2] == 1).all() and image.sum() == 3 * 20 * 20
    torch.testing.assert_close(target["labels"], torch.tensor([1]))

    _, target = DetectionDataset([record], meta, build_transforms(True, hflip_prob=0.0))[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 20, 30, 40]]))


def test_errors_name_the_file(tmp_path, image_writer):
    meta = DatasetMeta(["a"], [1])
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        DetectionDataset([ImageRecord(tmp_path / "missing.png", 0, 4, 4, *empty)], meta)[0]
    image_writer(tmp_path / "small.png", 4, 4)
    with pytest.raises(ValueError, match=r"small\.png is 4x4 \(WxH\) but its annotations say 8x4"):
        DetectionDataset([ImageRecord(tmp_path / "small.png", 0, 8, 4, *empty)], meta)[0]
