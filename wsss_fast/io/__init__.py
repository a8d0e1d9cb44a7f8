"""Output files: atomic writes, CAM files, overlays, and the run state that makes runs resumable."""

from wsss_fast.io.atomic import atomic_write, atomic_write_bytes, atomic_write_json
from wsss_fast.io.cam_files import (CAM_FORMATS, CamFileError, CamRecord, load_cam_file,
                                    save_cam_file)

__all__ = ["CAM_FORMATS", "CamFileError", "CamRecord", "atomic_write", "atomic_write_bytes",
           "atomic_write_json", "load_cam_file", "save_cam_file"]
