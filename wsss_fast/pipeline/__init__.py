"""The library API under the CLI: one typed function per stage, each taking an options
dataclass and returning its result, raising ``PipelineError`` subclasses that carry their cause.

    from wsss_fast.pipeline import ExtractOptions, extract
    result = extract(ExtractOptions(data="data/synth", split="val", model="mctformer_v2_tiny",
                                    checkpoint="runs/v2/checkpoint.pth", out="cams_v2"))
    result.counts, result.manifest, result.exit_status

Dataset stages (extract, pseudo_label, refine) run through ``run_dataset_job``: resumable,
sharded over torchrun ranks, journaled, with a manifest.
"""

from wsss_fast.pipeline.errors import InputError, NothingToDo, OptionsError, PipelineError
from wsss_fast.pipeline.evaluate import EvaluateOptions, EvaluateResult, evaluate
from wsss_fast.pipeline.extract import ExtractOptions, extract
from wsss_fast.pipeline.job import JobResult, JobSpec, run_dataset_job
from wsss_fast.pipeline.prototypes import PrototypesOptions, build_prototypes
from wsss_fast.pipeline.pseudo_label import PseudoLabelOptions, pseudo_label
from wsss_fast.pipeline.refine import RefineOptions, refine
from wsss_fast.pipeline.synth import SynthOptions, synth
from wsss_fast.pipeline.train import TrainResult, train
from wsss_fast.train import TrainConfig

__all__ = ["EvaluateOptions", "EvaluateResult", "ExtractOptions", "InputError", "JobResult",
           "JobSpec", "NothingToDo", "OptionsError", "PipelineError", "PrototypesOptions",
           "PseudoLabelOptions", "RefineOptions", "SynthOptions", "TrainConfig", "TrainResult",
           "build_prototypes", "evaluate", "extract", "pseudo_label", "refine",
           "run_dataset_job", "synth", "train"]
