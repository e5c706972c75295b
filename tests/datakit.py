"""Small ImageFolder trees for tests: symbolic links to the shared data sets' real images, never copies."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

FEW_CLASSES = ("cat", "dog", "ship")  # a labelled folder small enough for the serving tests' extracts


def small_folder(dataset: Path, dest: Path, per_class: int, split: str = "train",
                 classes: Sequence[str] | None = None) -> Path:
    """An ImageFolder tree of symlinks to the first ``per_class`` images of each class of ``dataset/split`` (of
    ``classes`` only, when given)."""
    for class_dir in sorted((dataset / split).iterdir()):
        if classes is not None and class_dir.name not in classes:
            continue
        target = dest / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            (target / image.name).symlink_to(image.resolve())
    return dest
