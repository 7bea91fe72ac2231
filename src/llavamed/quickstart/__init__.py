"""``llavamed quickstart``: the whole LLaVA-Med pipeline end to end on the embedded default.

MedSynth world -> PMC ingestion + domains -> stage-1 alignment set -> self-instruct conversations
(the embedded SmolLM2 behind a local OpenAI-compatible server, the same path a user points at
GPT-4 or vLLM) -> stage-0 caption pairs -> stage 0 (vision pretraining) -> stage 0b (the tower
learns the VQA train split) -> stage 1 -> stage 2 -> zero-shot VQA -> VQA fine-tuning -> VQA
again with the blank-image ablation -> report.

Every stage is keyed by a hash of its settings and of the keys of the stages it reads (so of every
earlier stage's settings), recorded in ``OUT/quickstart_state.json`` once it finishes, with a
fingerprint of its output files (content hashes; ``OUT/.quickstart_outputs.json`` lists them). A
re-run skips finished stages whose key is unchanged and whose output is still there unchanged; a
killed run resumes inside the interrupted stage (each stage's own tool resumes from its last saved
state), and its seconds before the kill count in the stage's wall time. A stage whose settings
changed, or whose output files were deleted or edited, starts over in a clean folder, and so does
every stage that reads one that ran again (unless that one only retried an incomplete run and left
the file its readers read unchanged: ``Stage.product``). The MedSynth stage's settings include the generator
version, so a new renderer redoes everything.
"""

from llavamed.quickstart.configs import training_configs
from llavamed.quickstart.pipeline import (
    STATE_FILE,
    Pipeline,
    Stage,
    StageError,
    StageResult,
    remaining_seconds,
)
from llavamed.quickstart.presets import SIZES, QuickstartOptions, SizePreset
from llavamed.quickstart.report import build_report, render_markdown
from llavamed.quickstart.run import run_quickstart, stage0_cap_note

__all__ = [
    "SIZES",
    "STATE_FILE",
    "Pipeline",
    "QuickstartOptions",
    "SizePreset",
    "Stage",
    "StageError",
    "StageResult",
    "build_report",
    "remaining_seconds",
    "render_markdown",
    "run_quickstart",
    "stage0_cap_note",
    "training_configs",
]
