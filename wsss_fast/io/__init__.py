"""Output files: atomic writes, CAM files, overlays, and the run state that makes runs resumable;
run locks and interrupts."""

from wsss_fast.io.atomic import (DiskFull, atomic_write, atomic_write_bytes, atomic_write_group,
                                 atomic_write_json)
from wsss_fast.io.cam_files import (CAM_FORMATS, CamFileError, CamRecord, NonFiniteCams,
                                    check_finite_cams, load_cam_file, save_cam_file)
from wsss_fast.io.interrupts import Interrupted, handle_interrupts
from wsss_fast.io.locks import RunLocked

__all__ = ["CAM_FORMATS", "CamFileError", "CamRecord", "DiskFull", "Interrupted", "NonFiniteCams",
           "RunLocked", "atomic_write", "atomic_write_bytes", "atomic_write_group",
           "atomic_write_json", "check_finite_cams", "handle_interrupts", "load_cam_file",
           "save_cam_file"]
