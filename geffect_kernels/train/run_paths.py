"""Every path a run writes or deletes stays inside its output folder: no component below ``--out`` (``runs/``,
``runs/<objective>/``, ``results/``, a run's files and folders) may be a symbolic link, checked before anything is
written. A link there would make the run write, replace or delete files elsewhere (another run's checkpoint, a
``summary.json`` of another folder); the folder named by ``--out`` itself may be a link, the user's own choice
(the way to put runs on a bigger disk)."""
from __future__ import annotations

from pathlib import Path


def refuse_links(root, *relative) -> None:
    """ValueError naming the first symbolic link among the components of ``root/r`` below ``root``, for each
    ``r`` of ``relative`` (``root`` itself is not looked at)."""
    root = Path(root)
    for rel in relative:
        path = root
        for part in Path(rel).parts:
            path = path / part
            if path.is_symlink():
                raise ValueError(f"{path} is a symbolic link: a run writes only inside {root}, never through a "
                                 f"link; remove it or choose another --out (nothing was written)")
            if not path.exists():
                break
